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

    Plain prompts are tokenized as `jaxtune generate` tokenizes them (BOS as in training, no EOS).
    With `chat_template` (a built-in name, jinja string, file or tokenizer_config.json; "auto": the
    run's chat task template, else the tokenizer's) each prompt becomes one user turn rendered with
    the template and tokenized as `jaxtune generate --chat` does, and the template's end-of-turn
    also stops a row. Rows are sampled `batch_size` per device call; EOS always stops a row.
    """

    def __init__(self, loaded, *, batch_size: int = 32, chat_template: str | None = None):
        self.loaded, self.batch_size = loaded, batch_size
        tok = loaded.tokenizer
        self.template, self.end_text, self.stop_ids = None, "", (tok.eos_id,)
        if chat_template:
            from jaxtune import chat_loop

            self.template = chat_loop.choose_template(None if chat_template == "auto" else chat_template, tok,
                                                      loaded.config)
            self.end_text = chat_loop.end_of_turn(self.template, tok)
            self.stop_ids = chat_loop.stop_tokens(tok, self.end_text)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        from jaxtune.data import chat, pipeline
        from jaxtune.data.tokenizers import encode_with_specials, start_sequence

        tok = self.loaded.tokenizer
        if self.template is None:
            return pipeline.tokenize_prompts(tok, prompts)
        kw = dict(bos_token=getattr(tok, "bos_token", None), eos_token=getattr(tok, "eos_token", None))
        texts = [chat.render_chat([{"role": "user", "content": p}], self.template, add_generation_prompt=True, **kw)
                 for p in prompts]
        return [start_sequence(tok, encode_with_specials(tok, t), chat=True) for t in texts]

    def complete(self, prompts, *, max_new_tokens, temperature, top_p, seed, stop=()) -> list[Completion]:
        from jaxtune import generate

        tok = self.loaded.tokenizer
        stop = (*stop, self.end_text) if self.end_text else tuple(stop)
        outputs = generate.generate(
            self.loaded.model, self.loaded.params, self.encode(prompts),
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p if temperature else None,
            stop_tokens=self.stop_ids, seed=seed, pad_id=tok.pad_id, batch_size=self.batch_size, keep_stop=True,
        )
        completions = []
        for out in outputs:
            stopped = bool(out) and out[-1] in self.stop_ids
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
