"""Objectives: pure functions of arrays, (logits or per-token stats, batch) -> (loss, metrics), in float32."""

from jaxtune.objectives.logprobs import TokenStats, head_token_stats, model_token_stats, token_logprobs, token_stats
from jaxtune.objectives.preference import kto_loss, masked_sequence_sums, preference_loss, sequence_logps
from jaxtune.objectives.sft import sft_loss, sft_loss_from_stats

__all__ = ["TokenStats", "head_token_stats", "kto_loss", "masked_sequence_sums", "model_token_stats", "preference_loss",
           "sequence_logps", "sft_loss", "sft_loss_from_stats", "token_logprobs", "token_stats"]
