"""How every benchmark here times: statements taken in turns, in blocks of
calls, with torch.utils.benchmark's Timer, until each has had its share of
timed time; medians and IQRs over the blocks.

A block is one Timer.timeit(calls): the Timer's clock synchronizes the
accelerator when one is present, at the block's start and end only, so a
block of GPU calls is timed whole, launches and kernels, and is never
synchronized between its calls."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .quiet_imports import import_cpp_extension_quietly

import_cpp_extension_quietly()  # before torch.utils.benchmark, which imports it

from torch.utils.benchmark import Measurement, Timer  # noqa: E402

__all__ = ["BLOCKS_PER_RUN_TIME", "Measurement", "time_in_turns"]

BLOCKS_PER_RUN_TIME = 25  # timed blocks of calls per min_run_time
WARM_UP_FROM_CALLS = 4  # a block of this many calls or more starts with an untimed one


def time_in_turns(
    statements: Sequence[Callable[[], object]],
    threads: int,
    min_run_time: float,
    on_block: Callable[[int, Measurement], None] | None = None,
) -> list[Measurement]:
    """Times the statements in turns, a block of calls each, until each has had
    min_run_time: a machine that slows down or speeds up meanwhile (other
    processes, clocks) then shifts every statement alike, and the ratios between
    them hold. A block lasts about min_run_time / BLOCKS_PER_RUN_TIME, and at
    least one call. Each round starts one statement later than the last, so
    that none always follows the same one (a large copy sweeps the caches), and
    a block of short calls starts with an untimed call, so that it does not pay
    for the cache state the previous statement left. Every statement runs twice
    untimed first (compilation, allocator, first touch of fresh memory; then the
    call that sizes its blocks). on_block(index, block) follows each timed block
    of the statement at index (block.number_per_run calls in block.raw_times[0] seconds)."""
    def calls_per_block(seconds_per_call: float) -> int:
        return max(1, round(min_run_time / BLOCKS_PER_RUN_TIME / max(seconds_per_call, 1e-9)))

    timers, calls = [], []
    for statement in statements:
        statement()  # warm-up
        timer = Timer("statement()", globals={"statement": statement}, num_threads=threads)
        timers.append(timer)
        calls.append(calls_per_block(timer.timeit(1).median))
    blocks: list[list[Measurement]] = [[] for _ in timers]
    spent = [0.0] * len(timers)
    rounds = 0
    while timers and (not blocks[0] or min(spent) < min_run_time):
        for step in range(len(timers)):
            i = (rounds + step) % len(timers)
            if calls[i] >= WARM_UP_FROM_CALLS:
                statements[i]()
            block = timers[i].timeit(calls[i])
            blocks[i].append(block)
            spent[i] += block.raw_times[0]
            calls[i] = calls_per_block(block.median)  # one call, just after the warm-up, may have been slow
            if on_block:
                on_block(i, block)
        rounds += 1
    return [Measurement.merge(measurements)[0] for measurements in blocks]
