"""The clocks, and telling a step back of the wall clock from time running on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker.clock import STEP_TOLERANCE, FakeClock, StepWatch


def test_a_fake_clocks_step_moves_the_wall_time_and_not_the_monotonic_time() -> None:
    """advance() moves both; step() moves the wall time alone, as NTP stepping a clock does."""
    clock = FakeClock()
    start = clock.now()
    clock.advance(10)
    clock.step(-3600)

    assert -3590 == (clock.now() - start).total_seconds()
    assert 10 == clock.monotonic()


def test_a_step_back_is_told_until_followed_then_measured_from_there() -> None:
    """The step is told again until followed() says the plans moved; a later step is told
    alone."""
    clock = FakeClock()
    watch = StepWatch(clock)
    clock.advance(5)
    clock.step(-3600)

    assert pytest.approx(3600) == watch.stepped_back()
    assert pytest.approx(3600) == watch.stepped_back()
    watch.followed(watch.stepped_back())
    clock.advance(5)
    assert 0.0 == watch.stepped_back()
    clock.step(-120)
    assert pytest.approx(120) == watch.stepped_back()


def test_a_step_forward_is_told_once_and_a_later_step_back_measured_from_it() -> None:
    """Forward is also what a suspended machine looks like (its tasks are overdue indeed):
    not a step back, only told once by jumped_forward()."""
    clock = FakeClock()
    watch = StepWatch(clock)
    clock.step(7200)
    assert 0.0 == watch.stepped_back()
    assert pytest.approx(7200) == watch.jumped_forward()
    assert 0.0 == watch.jumped_forward()
    clock.step(-30)
    assert pytest.approx(30) == watch.stepped_back()
    assert 0.0 == watch.jumped_forward()


@given(
    looks=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=3600),  # seconds between two looks
            st.floats(min_value=-0.5, max_value=0.5),  # slewing meanwhile, back or forward
        ),
        max_size=200,
    )
)
def test_time_running_on_and_slewing_are_never_a_step_back(
    looks: list[tuple[float, float]],
) -> None:
    """However long time runs and however the clock slews within the tolerance between two
    looks, for as long as that goes on, no step is told, back or forward."""
    assert STEP_TOLERANCE > 0.5
    clock = FakeClock()
    watch = StepWatch(clock)
    for seconds, slew in looks:
        clock.advance(seconds)
        clock.step(slew)
        assert 0.0 == watch.stepped_back()
    assert 0.0 == watch.jumped_forward()
