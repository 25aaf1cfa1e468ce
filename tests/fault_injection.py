"""Runs the `jaxtune` command with a fault injected, for the kill and disk-fault tests.

    python -m tests.fault_injection FAULT -- train --config cfg.py --workdir W

FAULT is one of
  kill_after_step:N  SIGKILL this process right after step N is logged (between steps: before that
                     step's checkpoint, with the next step not yet started);
  kill_in_save:N     SIGKILL this process inside the asynchronous save of step N, after its files are
                     written and before orbax commits them (the rename of the temporary directory);
                     N=1 is the very first save.
A real SIGKILL, so no Python cleanup runs: exactly what a preempted or OOM-killed job leaves behind.
"""

from __future__ import annotations

import os
import signal
import sys


def install(fault: str) -> None:
    kind, _, value = fault.partition(":")
    step = int(value)
    if kind == "kill_after_step":
        from jaxtune import metrics

        write = metrics.MetricsWriter.write

        def write_then_die(self, at_step, row):
            out = write(self, at_step, row)
            if at_step == step and "loss" in row:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        metrics.MetricsWriter.write = write_then_die
    elif kind == "kill_in_save":
        from orbax.checkpoint._src.path import atomicity

        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def die_before_commit(self):
            if self.get_final().name == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            return await finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = die_before_commit
    else:
        raise SystemExit(f"unknown fault {fault!r}")


def main(argv: list[str]) -> int:
    fault, separator, *command = argv
    assert separator == "--", "usage: python -m tests.fault_injection FAULT -- jaxtune arguments"
    install(fault)
    from jaxtune import cli

    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
