"""Long hunts, opt-in (`make stress`, pytest -m stress): the same state machines as the
fast suite with many more examples and longer programs."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from tests import test_crash_consistency as crash
from tests import test_raid_stateful as raid

pytestmark = pytest.mark.stress


@pytest.mark.parametrize(("level", "n"), raid.CASES, ids=[f"{lvl}-{n}" for lvl, n in raid.CASES])
def test_raid_state_machine_long(level: str, n: int) -> None:
    machine = raid.machine_for(level, n)
    machine.TestCase.settings = settings(
        max_examples=600, stateful_step_count=60, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    machine.TestCase().runTest()


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "bitmap"])
@pytest.mark.parametrize("level", list(crash.CASES))
def test_crash_consistency_long(level: str, journal: bool) -> None:
    machine = crash.machine_for(level, journal)
    machine.TestCase.settings = settings(crash.SETTINGS, max_examples=400, stateful_step_count=40)
    machine.TestCase().runTest()
