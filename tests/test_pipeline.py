"""The pipeline polling and delivery share: claims, lanes within their width, results written in
rounds, claims renewed while held, errors and stops.

A small Work over an in-memory table stands in for the store and the I/O, so each rule is seen
on its own; the poll drain and the delivery pass run through it in their own tests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
from typing import Any

import pytest

from tracker.pipeline import Claimed, Pace, Pipeline


@dataclasses.dataclass
class Table:
    """Rows due in id order, what the rounds wrote, and what happened when."""

    due: collections.deque[int]
    written: list[int] = dataclasses.field(default_factory=list)
    round_sizes: list[int] = dataclasses.field(default_factory=list)
    renewals: int = 0
    timeline: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    in_flight: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    most_in_flight: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    claimed_while_busy: int = 0
    #: (results written, rows asked for) of each round
    rounds: list[tuple[int, int]] = dataclasses.field(default_factory=list)


class ToyWork:
    """Claims ``claim`` rows at a time; row n goes to lane "a" (even) or "b" (odd)."""

    name = "toy"
    refill_on_write = False

    def __init__(
        self,
        table: Table,
        *,
        claim: int = 8,
        width: int = 2,
        takes: float = 0.001,
        pace: Pace | None = None,
        renew_every: float = 10.0,
        round_takes: float = 0.0,
        fails_on: int | None = None,
        ahead: bool = False,
        reclaim_every: float | None = None,
    ) -> None:
        self.table = table
        #: claim by what is left to perform (as the poll drain does), not by what is unwritten
        self.ahead = ahead
        self.claim = claim
        self.width = width
        self.takes = takes
        self.pace = pace or Pace()
        self._renew_every = renew_every
        self._reclaim_every = reclaim_every
        self.round_takes = round_takes
        self.fails_on = fails_on
        self.outstanding = 0

    def claim_size(self, pipeline: Pipeline[int, int]) -> int:
        if self.ahead:
            return self.claim if pipeline.held < self.claim else 0
        return self.claim if self.outstanding < self.claim else 0

    def renew_every(self) -> float:
        return self._renew_every

    def reclaim_every(self) -> float | None:
        return self._reclaim_every

    def claim_in(self) -> float | None:
        return None

    def unwritten(self) -> bool:
        return False

    async def round(self, results: list[int], claim: int, *, renew: bool) -> Claimed[int, int]:
        table = self.table
        table.timeline.append(("round", len(results)))
        table.rounds.append((len(results), claim))
        if results:
            table.round_sizes.append(len(results))
        await asyncio.sleep(self.round_takes)
        table.written += results
        self.outstanding -= len(results)
        table.renewals += renew
        if claim and sum(table.in_flight.values()):
            table.claimed_while_busy += 1
        rows = [table.due.popleft() for _ in range(min(claim, len(table.due)))]
        self.outstanding += len(rows)
        table.timeline.append(("round_end", 0))
        units = [("ab"[row % 2], self.width, row) for row in rows]
        return Claimed(units=units, more=claim > 0 and len(rows) == claim)

    async def perform(self, unit: int) -> int:
        table = self.table
        lane = "ab"[unit % 2]
        table.timeline.append(("perform", unit))
        table.in_flight[lane] += 1
        table.most_in_flight[lane] = max(table.most_in_flight[lane], table.in_flight[lane])
        try:
            await asyncio.sleep(self.takes)
            if unit == self.fails_on:
                raise RuntimeError(f"unit {unit} failed")
        finally:
            table.in_flight[lane] -= 1
        return unit

    def dropped(self, unit: int) -> None:
        self.outstanding -= 1


def table_of(rows: int) -> Table:
    return Table(due=collections.deque(range(rows)))


async def test_every_claimed_row_is_performed_once_and_written_once() -> None:
    """All due rows are claimed, performed and written exactly once; run() counts them."""
    table = table_of(50)
    performed = await Pipeline(ToyWork(table)).run()
    assert performed == 50
    assert sorted(table.written) == list(range(50))


async def test_results_are_written_together_at_the_next_round() -> None:
    """Results that finish while a round runs wait for the next one, which takes them all."""
    table = table_of(64)
    await Pipeline(ToyWork(table, claim=16, width=8, round_takes=0.01)).run()
    assert sorted(table.written) == list(range(64))
    assert max(table.round_sizes) > 1
    assert len(table.round_sizes) < 64


async def test_a_lane_runs_at_most_its_width_at_once_in_claim_order() -> None:
    """Each lane has at most ``width`` units under way, reaches it, and starts them in order."""
    table = table_of(40)
    await Pipeline(ToyWork(table, claim=20, width=3, takes=0.005)).run()
    assert table.most_in_flight == {"a": 3, "b": 3}
    for lane in (0, 1):
        started = [n for what, n in table.timeline if what == "perform" and n % 2 == lane]
        assert started == sorted(started)


async def test_the_next_claim_is_taken_while_units_are_under_way() -> None:
    """The I/O does not wait for the bookkeeping: claims come while units are performed."""
    table = table_of(100)
    await Pipeline(ToyWork(table, claim=10, width=2, takes=0.005)).run()
    assert table.claimed_while_busy > 0


@pytest.mark.parametrize("apart", [False, True])
async def test_with_claim_apart_a_claim_due_while_results_wait_goes_first_alone(
    apart: bool,
) -> None:
    """Pace.claim_apart: when a claim is due and results wait, the claim is a round of its own,
    before the write, so the lanes get their next units without waiting for the write (which
    follows at once); without it one round does both. Every row is still written once."""
    table = table_of(100)
    pace = Pace(claim_apart=apart)
    work = ToyWork(table, claim=10, width=2, takes=0.005, pace=pace, ahead=True)
    await Pipeline(work).run()

    assert sorted(table.written) == list(range(100))
    both = [r for r in table.rounds if r[0] and r[1]]
    assert (both == []) is apart
    assert sum(written for written, _ in table.rounds) == 100


class ReadyWork(ToyWork):
    """Claims whose rows are decided without I/O (``ready``), but for one slow unit in the
    first claim: as a drain finds tasks past give_up_after, or of a platform gone from the
    config, while one batch is at the relay."""

    #: renewals in rounds that claimed and wrote nothing (Pace.claim_apart's own rounds)
    renewed_while_claiming = 0

    def claim_size(self, pipeline: Pipeline[int, int]) -> int:
        return self.claim if self.table.due else 0

    async def round(self, results: list[int], claim: int, *, renew: bool) -> Claimed[int, int]:
        table = self.table
        table.rounds.append((len(results), claim))
        table.written += results
        table.renewals += renew
        self.renewed_while_claiming += renew and claim > 0 and not results
        await asyncio.sleep(self.round_takes)
        rows = [table.due.popleft() for _ in range(min(claim, len(table.due)))]
        units = [("a", 1, row) for row in rows if row == 0]
        ready = [row for row in rows if row != 0]
        return Claimed(units=units, ready=ready, more=claim > 0 and len(rows) == claim)


async def test_claims_of_rows_decided_without_io_hold_back_no_write_and_no_renewal() -> None:
    """With Pace.claim_apart, a claim-only round is never followed by another while results
    wait: claims that give the lanes nothing (every row decided without I/O) alternate with
    writes, and the slow unit's claim is renewed as it falls due meanwhile (here at every
    round: no renewal period)."""
    table = table_of(400)
    work = ReadyWork(
        table, claim=10, takes=0.3, pace=Pace(claim_apart=True), renew_every=0.0,
        round_takes=0.002,
    )  # fmt: skip
    await Pipeline(work).run()

    assert sorted(table.written) == list(range(400))
    claim_only = [written == 0 and claim > 0 for written, claim in table.rounds[1:]]
    assert not any(a and b for a, b in itertools.pairwise(claim_only))
    assert work.renewed_while_claiming > 0


class FailingClaimWork(ToyWork):
    """ToyWork whose first claim-only round taken while results wait fails (a database gone)
    once ``fail`` is set."""

    def __init__(self, table: Table, **kwargs: Any) -> None:
        super().__init__(table, **kwargs)
        self.performed: list[int] = []
        self.waiting_then: list[int] = []
        self.claim_only_began = asyncio.Event()
        self.fail = asyncio.Event()

    async def perform(self, unit: int) -> int:
        self.performed.append(await super().perform(unit))
        return unit

    async def round(self, results: list[int], claim: int, *, renew: bool) -> Claimed[int, int]:
        waiting = [n for n in self.performed if n not in self.table.written]
        if not results and claim and waiting and not self.claim_only_began.is_set():
            self.waiting_then = waiting
            self.claim_only_began.set()
            await self.fail.wait()
            raise RuntimeError("database gone")
        return await super().round(results, claim, renew=renew)


async def test_results_waiting_behind_a_failed_claim_only_round_are_still_written() -> None:
    """A run cut off while a claim-only round (Pace.claim_apart) runs, that round then
    failing: the results that waited for the next round were never in it, and are written at
    the end all the same."""
    table = table_of(100)
    work = FailingClaimWork(
        table, claim=10, width=2, takes=0.001, pace=Pace(claim_apart=True), ahead=True
    )
    run = asyncio.create_task(Pipeline(work).run())
    await asyncio.wait_for(work.claim_only_began.wait(), 5)
    run.cancel()
    work.fail.set()
    with contextlib.suppress(asyncio.CancelledError):
        await run

    assert work.waiting_then
    assert set(work.waiting_then) <= set(table.written)


async def test_a_short_claim_ends_the_run_once_everything_is_written() -> None:
    """A claim that finds fewer rows than asked is the last; run() returns when all is written."""
    table = table_of(5)
    work = ToyWork(table, claim=8)
    assert await Pipeline(work).run() == 5
    assert work.outstanding == 0
    rounds = [n for what, n in table.timeline if what == "round"]
    assert rounds[0] == 0  # the first round only claimed
    assert sum(rounds) == 5


async def test_while_a_slow_unit_is_under_way_rows_falling_due_are_claimed_every_period() -> None:
    """With reclaim_every, a short claim does not end the claiming while units are under way:
    a row falling due meanwhile is claimed within the period and performed on its lane, long
    before the slow unit is done; without it, it waits for the next run."""
    for reclaim_every, claimed_before_done in ((0.05, True), (None, False)):
        table = table_of(1)  # row 0: lane "a", slow
        work = ToyWork(table, claim=8, takes=0.5, reclaim_every=reclaim_every)
        run = asyncio.create_task(Pipeline(work).run())
        await asyncio.sleep(0.1)
        table.due.append(1)  # falls due on lane "b" while row 0 is under way
        await run

        performed = [unit for kind, unit in table.timeline if kind == "perform"]
        assert claimed_before_done == (performed == [0, 1]), (reclaim_every, table.timeline)
        assert table.written == ([0, 1] if claimed_before_done else [0])


async def test_a_claim_size_of_0_is_asked_again_when_the_work_says() -> None:
    """A work whose claim_size says 0 for a while (the poll drain, after finding an upstream
    without due rows) is asked again at the time its claim_in names, not only when a unit
    finishes: a row it then claims runs beside a slow unit, long before that one is done."""

    class Later(ToyWork):
        opens_at = 0.0

        def claim_size(self, pipeline: Pipeline[int, int]) -> int:
            if self.table.written or self.outstanding == 0:
                return super().claim_size(pipeline)
            return self.claim if asyncio.get_running_loop().time() >= self.opens_at else 0

        def claim_in(self) -> float | None:
            return self.opens_at - asyncio.get_running_loop().time()

    table = table_of(1)  # row 0: lane "a", slow
    work = Later(table, claim=8, takes=0.5, reclaim_every=0.05)
    work.opens_at = asyncio.get_running_loop().time() + 0.1
    run = asyncio.create_task(Pipeline(work).run())
    await asyncio.sleep(0.02)
    table.due.append(1)  # due, but claim_size says 0 until opens_at
    await run

    performed = [unit for kind, unit in table.timeline if kind == "perform"]
    assert performed == [0, 1]
    assert table.written == [0, 1]
    assert table.timeline.index(("perform", 1)) < table.timeline.index(("round", 1))


async def test_units_taken_back_from_the_lanes_are_not_performed_and_the_run_ends() -> None:
    """take_back_queued() hands the units not started yet back to the work: they are never
    performed, the units under way finish and are written, and the run ends with none held."""
    table = table_of(12)
    taken: list[int] = []

    class TakesBack(ToyWork):
        def claim_size(self, pipeline: Pipeline[int, int]) -> int:
            if table.in_flight["a"] and not taken:
                taken.extend(pipeline.take_back_queued())
                self.outstanding -= len(taken)
                return 0
            return 0 if taken else super().claim_size(pipeline)

    pipeline = Pipeline(TakesBack(table, claim=12, width=1, takes=0.02))
    performed = await pipeline.run()

    assert taken  # rows of both lanes, queued behind the first of each
    assert performed == len(table.written) == 12 - len(taken)
    assert not set(taken) & set(table.written)
    assert sorted([*taken, *table.written]) == list(range(12))
    assert pipeline.held == 0


async def test_claims_are_renewed_while_a_unit_outlasts_the_renewal_period() -> None:
    """A unit slower than several renewal periods keeps its claim renewed, and only then."""
    table = table_of(1)
    await Pipeline(ToyWork(table, claim=4, takes=0.5, renew_every=0.05)).run()
    assert table.written == [0]
    # About ten fit in; a loop held up elsewhere may make fewer, never more.
    assert 3 <= table.renewals <= 11


async def test_no_renewal_when_units_finish_within_the_period() -> None:
    """Renewal rounds are for claims still held: quick units need none."""
    table = table_of(20)
    await Pipeline(ToyWork(table, claim=4, renew_every=5.0)).run()
    assert table.renewals == 0


async def test_a_failing_unit_ends_the_run_with_its_error_after_what_finished_is_written() -> None:
    """The error surfaces from run(); results that finished before it are still written."""
    table = table_of(20)
    work = ToyWork(table, claim=20, width=1, fails_on=7)
    with pytest.raises(RuntimeError, match="unit 7 failed"):
        await Pipeline(work).run()
    assert {0, 2, 4, 6} <= set(table.written)
    assert 7 not in table.written


async def test_until_stops_claiming_and_lets_units_under_way_finish() -> None:
    """Once ``until`` is set no more rows are claimed; what was claimed is still written."""
    table = table_of(1000)
    until = asyncio.Event()
    work = ToyWork(table, claim=10, takes=0.01)
    run = asyncio.create_task(Pipeline(work, until=until).run())
    await asyncio.sleep(0.05)
    until.set()
    performed = await asyncio.wait_for(run, 5)
    assert 0 < performed < 1000
    assert len(table.written) == performed
    assert len(table.due) == 1000 - performed


@pytest.mark.parametrize("hold_off", [0.0, 0.5])
async def test_workers_hold_off_their_next_unit_while_a_round_runs(hold_off: float) -> None:
    """With a hold-off no unit starts while a store round runs; without one, units do."""
    table = table_of(60)
    work = ToyWork(
        table, claim=30, width=2, takes=0.002, round_takes=0.02, pace=Pace(hold_off=hold_off)
    )
    await Pipeline(work).run()
    started_during_rounds = 0
    in_round = False
    for what, _ in table.timeline:
        if what == "round":
            in_round = True
        elif what == "round_end":
            in_round = False
        elif in_round:
            started_during_rounds += 1
    assert (started_during_rounds == 0) == (hold_off > 0)


async def test_a_run_cancelled_during_a_round_lets_go_of_what_the_round_claimed() -> None:
    """The round finishes (it is shielded), and each unit it claimed is handed to dropped()."""
    table = table_of(20)
    work = ToyWork(table, claim=8, round_takes=0.2)
    run = asyncio.create_task(Pipeline(work).run())
    await asyncio.sleep(0.05)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert len(table.due) == 12  # the round claimed its 8 rows
    assert work.outstanding == 0
    assert table.written == []
