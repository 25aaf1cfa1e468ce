"""Reward functions for RL with verifiable rewards.

The contract (the one TRL's GRPOTrainer uses): ``reward_fn(prompts, completions, **fields) ->
list[float | None]``, one float per completion (None where the function does not apply to
that record, e.g. a math reward on an instruction prompt: it then counts as 0 in the sum and
is left out of that function's metrics); ``fields`` holds every other field of the records, one
list per field aligned with ``prompts`` (so a math reward reads ``answer``, an instruction reward
``constraints``). A config names reward functions by built-in name or by module path
(``my_pkg.rewards:brevity``); several are summed with weights (`RewardSet`).

Built-ins: ``math`` (final answer vs the record's ``answer``), ``worked_steps`` (the share of the
record's reference ``solution`` equations reproduced in order, the answer counted only after all
of them: no credit for a right number reached by wrong steps) and ``worked_solution`` (1 only when all
of them and the answer are right), ``instructions`` (fraction of
the record's ``constraints``, or IFEval ``instruction_id_list`` + ``kwargs``, satisfied, scored as
IFEval's reference scorer does: `rewards.ifeval_checkers`), ``instructions_all`` (1 only if all are),
and ``reward_model:<dir>``: a reward model trained with ``objective.type=reward`` (its workdir)
or exported as ``*ForSequenceClassification`` (an HF directory).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxtune import hub, loading, scoring  # scoring: the reward-model objective's scorer
from jaxtune import workdir as workdir_lib
from jaxtune.errors import UserError
from jaxtune.rewards.instructions import instruction_all, instruction_fraction
from jaxtune.rewards.math_answer import math_answer
from jaxtune.rewards.worked_steps import worked_solution, worked_steps

RewardFn = Callable[..., list[float]]

BUILTIN: dict[str, RewardFn] = {
    "math": math_answer,
    "instructions": instruction_fraction,
    "instructions_all": instruction_all,
    "worked_steps": worked_steps,
    "worked_solution": worked_solution,
}


REWARD_MODEL_PREFIX = loading.REWARD_MODEL_PREFIX


def load_reward_fn(spec: str) -> RewardFn:
    """A built-in name, ``reward_model:<workdir or HF directory>`` (a trained reward model, scored
    by `jaxtune.scoring.reward_fn`), or ``package.module:function`` (``package.module.function`` too)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith(REWARD_MODEL_PREFIX):
        return _reward_model(spec[len(REWARD_MODEL_PREFIX):], spec)
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise UserError(f"reward function {spec!r}: expected a built-in ({', '.join(BUILTIN)}) or 'module.path:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"reward function {spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"reward function {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def _reward_model(path: str, spec: str) -> RewardFn:
    from pathlib import Path

    if hub.is_hub_id(path):  # a reward model on the Hub (pinned for the run by loading.pin_hub_ids)
        return scoring.reward_fn(hf_dir=hub.local_path(path, "model"))
    directory = Path(path)
    if not path or not directory.is_dir():
        raise UserError(f"reward function {spec!r}: {path!r} is not a directory (a reward run's workdir or an "
                        "exported *ForSequenceClassification directory)")
    if (directory / workdir_lib.CHECKPOINTS).is_dir():
        return scoring.reward_fn(str(directory))
    return scoring.reward_fn(hf_dir=str(directory))


def reward_name(spec: str) -> str:
    """The metric name of a reward spec: the built-in name, `reward_model`, or the function's name."""
    if spec.startswith(REWARD_MODEL_PREFIX):
        return "reward_model"
    return spec if spec in BUILTIN else spec.replace(":", ".").rpartition(".")[2]


@dataclasses.dataclass
class RewardSet:
    """Several reward functions and their weights; `__call__` gives the weighted sum and each part."""

    names: list[str]
    fns: list[RewardFn]
    weights: list[float]

    @classmethod
    def from_specs(cls, specs: Sequence[str], weights: Sequence[float] = ()) -> RewardSet:
        specs = list(specs)
        if not specs:
            raise UserError("rewards: name at least one reward function (built-in or 'module.path:function')")
        weights = list(weights) or [1.0] * len(specs)
        if len(weights) != len(specs):
            raise UserError(f"rewards: {len(specs)} reward functions but {len(weights)} weights")
        names = [reward_name(s) for s in specs]
        if len(set(names)) != len(names):
            raise UserError(f"rewards: two reward functions share a name ({names}); metrics would collide")
        return cls(names, [load_reward_fn(s) for s in specs], [float(w) for w in weights])

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 fields: Mapping[str, Sequence[Any]]) -> tuple[list[float], dict[str, list[float | None]]]:
        """(total reward per completion, {name: that function's rewards, None where it does not apply})."""
        parts: dict[str, list[float]] = {}
        for name, fn in zip(self.names, self.fns):
            try:
                values = fn(list(prompts), list(completions), **fields)
            except TypeError as e:
                raise UserError(f"reward function {name!r}: {e} (records have fields {sorted(fields)})") from None
            values = [None if v is None else float(v) for v in values]
            if len(values) != len(completions):
                raise UserError(f"reward function {name!r} returned {len(values)} rewards for {len(completions)} completions")
            if not all(v is None or math.isfinite(v) for v in values):
                raise UserError(f"reward function {name!r} returned a non-finite reward: {values}")
            parts[name] = values
        totals = [sum(w * (parts[n][i] or 0.0) for n, w in zip(self.names, self.weights))
                  for i in range(len(completions))]
        return totals, parts
