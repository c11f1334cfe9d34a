"""The token bucket keeps the long-run rate, also with requests larger than its burst."""

import pytest

from shadowblk.integrity.rate_limit import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(("rate", "chunk"), [(1000.0, 100), (1000.0, 5000), (1e8, 8 << 20)])
def test_long_run_rate(rate: float, chunk: int) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, clock=clock, sleep=clock.sleep)
    for _ in range(50):
        bucket.take(chunk)
    expected = (50 * chunk - bucket.burst) / rate
    assert clock.now == pytest.approx(max(expected, 0), rel=0.02, abs=1e-6)


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)
