"""Mixing rates for several tasks: examples-proportional with caps (FLAN), explicit weights, or temperature.

Examples-proportional mixing gives task i the rate `min(n_i, cap_i) / sum_j min(n_j, cap_j)`: big
tasks stop drowning small ones once they pass the cap. Temperature mixing raises those capped
sizes to `1 / T` first (T=1 is examples-proportional; large T tends to uniform). The rates feed
Grain's deterministic proportional interleaving, so the mixture is the same on every run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from jaxtune.errors import UserError

MODES = ("examples_proportional", "weights", "temperature")


@dataclasses.dataclass(frozen=True)
class Mixture:
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    rates: tuple[float, ...]
    mode: str

    def describe(self) -> str:
        """One line per task: its effective rate and what it was computed from."""
        return "\n".join(f"  {name}: {rate:.2%} of examples ({size} records)"
                         for name, size, rate in zip(self.names, self.sizes, self.rates))


def mixture_rates(
    names: Sequence[str],
    sizes: Sequence[int],
    *,
    mode: str = "examples_proportional",
    weights: Sequence[float] | None = None,
    caps: Sequence[int] | None = None,
    temperature: float = 1.0,
) -> Mixture:
    """Normalised rates; `caps[i] == 0` means no cap for task i."""
    if mode not in MODES:
        raise UserError(f"config key 'data.mixture.mode' is {mode!r}; expected one of {', '.join(MODES)}")
    caps = list(caps or [0] * len(sizes))
    capped = [min(n, c) if c > 0 else n for n, c in zip(sizes, caps)]
    if mode == "weights":
        raw = list(weights or [1.0] * len(sizes))
    elif mode == "temperature":
        if not temperature > 0:
            raise UserError(f"config key 'data.mixture.temperature' must be > 0, got {temperature}")
        raw = [n ** (1.0 / temperature) for n in capped]
    else:
        raw = [float(n) for n in capped]
    zero = [name for name, r in zip(names, raw) if not r > 0 or not math.isfinite(r)]
    if zero:
        raise UserError(f"data.tasks {', '.join(zero)}: mixing rate is 0 (weight 0 or no records); remove the task "
                        "or give it a positive weight")
    total = sum(raw)
    return Mixture(tuple(names), tuple(int(n) for n in sizes), tuple(r / total for r in raw), mode)
