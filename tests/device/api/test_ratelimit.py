from device.api.ratelimit import FailedLoginLimiter


def test_blocks_after_the_limit_and_forgives_after_the_window() -> None:
    limiter = FailedLoginLimiter(max_failures=3, window_s=60)
    for t in (0, 1, 2):
        assert limiter.blocked_for("10.0.0.9", now=t) == 0
        limiter.failed("10.0.0.9", now=t)
    assert limiter.blocked_for("10.0.0.9", now=3) == 57
    assert limiter.blocked_for("10.0.0.8", now=3) == 0, "other clients are not affected"
    assert limiter.blocked_for("10.0.0.9", now=61) == 0
