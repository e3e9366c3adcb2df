"""Running a vendor tool for one sample, bounded in time, leaving no process behind."""

import os
import selectors
import subprocess
import time

# A line longer than this is not one sample of a status tool.
MAX_LINE_BYTES = 64 * 1024


def run_output(argv: list[str], timeout_s: float) -> str | None:
    """The tool's stdout if it exits 0 within `timeout_s`; None otherwise (it is killed on timeout)."""
    try:
        done = subprocess.run(
            argv, capture_output=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.decode(errors="replace")


def first_line(argv: list[str], timeout_s: float) -> str | None:
    """The first non-empty line a streaming tool (tegrastats) prints, then the tool is stopped.

    None when it prints nothing within `timeout_s`, exits first, or cannot be started.
    """
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except OSError:
        return None
    assert proc.stdout is not None
    try:
        return _read_line(proc.stdout.fileno(), time.monotonic() + timeout_s)
    finally:
        _stop(proc)


def _read_line(fd: int, deadline: float) -> str | None:
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            for line in buffer.split(b"\n")[:-1]:
                if line.strip():
                    return line.decode(errors="replace").strip()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(buffer) > MAX_LINE_BYTES or not selector.select(remaining):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:  # EOF: a last line without its newline still counts
                text = buffer.decode(errors="replace").strip()
                return text or None
            buffer += chunk


def _stop(proc: "subprocess.Popen[bytes]") -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
