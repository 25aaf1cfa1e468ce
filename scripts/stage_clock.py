"""Wall and CPU time of a stage, for the effect scripts (flan_effect.py, tulu_pipeline.py).

CPU seconds (this process and its finished children, every thread, user + system) are the
load-independent figure on a shared machine: a stage that keeps at least one core busy takes at
most its CPU seconds of wall time when it has the machine to itself, whatever the load was when it
was measured. The ratio cpu/wall says how many cores it kept busy.
"""

from __future__ import annotations

import resource
import time


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and of its waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class StageClock:
    """Started when made (or entered): `clock.stop()`, or leaving `with StageClock() as clock:`,
    sets `clock.times` = {"wall_s": ..., "cpu_s": ...} since then."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()

    def __enter__(self) -> StageClock:
        self.__init__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> dict[str, float]:
        self.times = {"wall_s": round(time.perf_counter() - self._wall, 1),
                      "cpu_s": round(cpu_seconds() - self._cpu, 1)}
        return self.times
