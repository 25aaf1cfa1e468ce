"""Text in, text out: the small sampling interface the data generators call, and its jaxtune model.

Self-Instruct and Evol-Instruct only need "complete these prompts"; keeping that behind
`Sampler.complete` lets tests drive the loops with canned completions, and lets the real one batch
many prompts per call of the KV-cache sampler (`generate.generate`, bucketed shapes, so a stream
of batches compiles a handful of times). `Metered` counts generated tokens and sampler time for
the throughput report.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str  # cut before the first stop string
    num_tokens: int  # tokens generated (the work done, stop token included)
    truncated: bool  # hit max_new_tokens with neither a stop token nor a stop string


class Sampler(Protocol):
    def complete(self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float, top_p: float | None,
                 seed: int, stop: Sequence[str] = ()) -> list[Completion]:
        """One completion per prompt, in order; reproducible for the same arguments."""


class ModelSampler:
    """A loaded model (`inference.load`: a run's latest checkpoint or an HF dir) behind `Sampler`.

    Prompts are tokenized as `jaxtune generate` tokenizes them (BOS as in training, no EOS) and
    sampled `batch_size` rows per device call; EOS always stops a row.
    """

    def __init__(self, loaded, *, batch_size: int = 32):
        self.loaded, self.batch_size = loaded, batch_size

    def complete(self, prompts, *, max_new_tokens, temperature, top_p, seed, stop=()) -> list[Completion]:
        from jaxtune import generate
        from jaxtune.data import pipeline

        tok = self.loaded.tokenizer
        outputs = generate.generate(
            self.loaded.model, self.loaded.params, pipeline.tokenize_prompts(tok, prompts),
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p if temperature else None,
            stop_tokens=(tok.eos_id,), seed=seed, pad_id=tok.pad_id, batch_size=self.batch_size, keep_stop=True,
        )
        completions = []
        for out in outputs:
            stopped = bool(out) and out[-1] == tok.eos_id
            full = tok.decode(out[:-1] if stopped else out)
            text = generate.truncate_at_stop_strings(full, stop)
            truncated = not stopped and len(out) >= max_new_tokens and text == full
            completions.append(Completion(text, len(out), truncated))
        return completions


class Metered:
    """Wraps a sampler; counts calls, prompts, generated tokens and seconds spent sampling."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.prompts = self.tokens = 0
        self.seconds = 0.0

    def complete(self, prompts, **kwargs) -> list[Completion]:
        if not prompts:
            return []
        start = time.perf_counter()
        out = self.sampler.complete(list(prompts), **kwargs)
        self.seconds += time.perf_counter() - start
        self.prompts += len(prompts)
        self.tokens += sum(c.num_tokens for c in out)
        return out


def derived_seed(*parts: int) -> int:
    """A sampler seed that depends only on `parts` (e.g. run seed, batch, stage), never on history."""
    import numpy as np

    return int(np.random.default_rng([int(p) for p in parts]).integers(2**31 - 1))
