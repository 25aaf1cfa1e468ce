"""Objectives: pure functions of arrays, (logits, batch) -> (loss, metrics), computed in float32."""

from jaxtune.objectives.logprobs import token_logprobs
from jaxtune.objectives.preference import kto_loss, preference_loss, sequence_logps
from jaxtune.objectives.sft import sft_loss

__all__ = ["kto_loss", "preference_loss", "sequence_logps", "sft_loss", "token_logprobs"]
