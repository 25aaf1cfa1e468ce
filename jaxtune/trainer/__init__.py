"""Training, split by job; nothing here names an objective (they plug in: jaxtune/objectives/).

- `state.py`: the train state (`build_state`: resume > HF dir > init_from > seed; where the
  weights come from is jaxtune/loading.py's, shared with generate/eval/export);
- `step.py`: the jitted step (the objective's loss sums / weight, gradient accumulation);
- `setup.py`: mesh, model, optimizer, abstract state, batch shapes and the jitted step, built
  without touching a device (`jaxtune plan` compiles the same);
- `loop.py`: `train()`, the loop with hooks for logging, evaluation, checkpoints and stopping.
"""

import flax.linen as nn  # noqa: F401  (kept as trainer.nn for callers)

from jaxtune import models  # noqa: F401  (kept as trainer.models for callers)
from jaxtune.loading import (base_model, base_params, build_model, peft_base_pointer, peft_spec, prepare_base,
                             start_weights, variables_for)
from jaxtune.trainer.loop import Hook, Loop, RunSummary, StopSignal, headline, train
from jaxtune.trainer.setup import TrainSetup, batch_shapes, build_setup, model_config_from
from jaxtune.trainer.state import (Start, TrainState, build_state, fresh_state, model_variables, plan_state,
                                   state_from_params)
from jaxtune.trainer.step import (LogitsApply, ModelApply, make_apply_fn, make_loss_fn, make_train_step, model_fns,
                                  split_microbatches)

__all__ = [
    "Hook", "LogitsApply", "Loop", "ModelApply", "RunSummary", "Start", "StopSignal", "TrainSetup", "TrainState",
    "base_model", "base_params", "batch_shapes", "build_model", "build_setup", "build_state", "fresh_state",
    "headline", "make_apply_fn", "make_loss_fn", "make_train_step", "model_config_from", "model_fns",
    "model_variables", "peft_base_pointer", "peft_spec", "plan_state", "prepare_base", "split_microbatches", "start_weights",
    "state_from_params", "train", "variables_for",
]
