import dataclasses

import pytest

from device.engine.probe import HardwareProfile, llvm_target_parts, probe


@pytest.fixture(scope="session")
def tvm_profile() -> HardwareProfile:
    """This machine's profile for the TVM tests, or a skip where TVM has no LLVM target for the CPU.

    Session-scoped so that the TVM backend tests' session fixtures (one compile they share) can
    use it, and the package-records tests' module fixtures too. `tvm: True`: the modules that use
    it have already skipped without apache-tvm, so the backend's runtime check must not stand in
    the way of what they test.
    """
    profile = probe()
    try:
        llvm_target_parts(profile)
    except ValueError as e:
        pytest.skip(f"TVM backs x86_64 and aarch64 only: {e}")
    return dataclasses.replace(profile, runtimes={**profile.runtimes, "tvm": True})
