"""A jaxtune model as an lm-evaluation-harness ``LM``: the published benchmarks, computed as everyone does.

`JaxtuneLM` answers lm-eval's three request types with jaxtune's own model code, so a workdir
(LoRA/DoRA/QLoRA runs included: `inference.from_workdir` rebuilds base + adapters) or an HF dir
scores exactly what lm-eval's ``hf`` backend scores on the same weights:

- ``loglikelihood``: lm-eval's `TemplateLM` splits (context, continuation) into tokens (trailing
  context spaces move to the continuation; an empty context gets the prefix token), then each
  pair is scored teacher-forced, keeping the last ``max_length + 1`` tokens as the ``hf`` backend
  does; the answer is (sum log p, whether every continuation token is the argmax).
- ``loglikelihood_rolling``: lm-eval's own disjoint rolling windows, each scored the same way.
- ``generate_until``: greedy decoding with jaxtune's KV-cache sampler (`jaxtune.generate`) up to
  ``max_gen_toks``, stopped at EOS, the text cut at the first ``until`` string (EOS's text too).

An encoder-decoder (T5, Flan-T5, mT5) is scored as lm-eval's ``hf`` backend scores a seq2seq
model: context and continuation are tokenized separately (the context as ``tokenizer(text)``,
ending in ``</s>``; the continuation without it), the last ``max_length`` context tokens go to the
encoder and the continuation is the decoder's target, shifted right behind the decoder start token
(`score_seq2seq_pairs`); generation encodes the last ``max_length`` context tokens.

Tokenization of a decoder-only model follows the ``hf`` backend: the tokenizer's own prefix (BOS where its post-processor
adds one) before every text that does not already start with BOS, special tokens spelled in the
text (chat templates) read as their ids. Requests are sorted by length and batched into
power-of-two shapes, so a task compiles a handful of times. ``apply_chat_template`` renders with
the model's chat template (the run's chat task template, else the tokenizer's).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import distributed, hub
from jaxtune import generate as generate_lib
from jaxtune.data.tokenizers import encode_with_specials
from jaxtune.errors import UserError

DEFAULT_MAX_LENGTH = 2048


@dataclasses.dataclass
class InMemoryModel:
    """The model being trained, as `JaxtuneLM` needs it (`inference.Loaded`'s fields; no saved config)."""

    model: Any
    params: Any
    tokenizer: Any
    config: Any = None


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("eval --harness needs lm-evaluation-harness: pip install 'jaxtune[harness]'") from None


@functools.partial(jax.jit, static_argnames=("model",))
def _token_logprobs(model, variables, inputs, targets, positions, segment_ids):
    """Per position: log p(target) and whether the target is the argmax (float32 softmax)."""
    logits = model.module.apply(variables, inputs, positions=positions, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def score_token_pairs(model, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int
                      ) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), greedy?) per (context ids, continuation ids), batched by length."""
    variables = generate_lib.as_variables(params)
    multiple = generate_lib.batch_multiple()
    batch_size = -(-batch_size // multiple) * multiple
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        length = generate_lib.bucket(max(len(pairs[i][0]) + len(pairs[i][1]) - 1 for i in chunk),
                                     generate_lib.MIN_PROMPT_BUCKET)
        arrays = {k: np.zeros((batch_size, length), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
        for row, i in enumerate(chunk):
            tokens = list(pairs[i][0]) + list(pairs[i][1])
            n = len(tokens) - 1
            arrays["inputs"][row, :n], arrays["targets"][row, :n] = tokens[:-1], tokens[1:]
            arrays["positions"][row, :n], arrays["segment_ids"][row, :n] = np.arange(n), 1
        logp, greedy = _token_logprobs(generate_lib.ByRepr(model), variables, arrays["inputs"], arrays["targets"],
                                       arrays["positions"], arrays["segment_ids"])
        logp, greedy = distributed.to_host(logp), distributed.to_host(greedy)
        for row, i in enumerate(chunk):
            n, cont = len(pairs[i][0]) + len(pairs[i][1]) - 1, len(pairs[i][1])
            results[i] = (float(logp[row, n - cont:n].sum()), bool(greedy[row, n - cont:n].all()))
    return results  # type: ignore[return-value]


@functools.partial(jax.jit, static_argnames=("model",))
def _seq2seq_token_logprobs(model, variables, inputs, segment_ids, decoder_inputs, targets, decoder_segment_ids):
    """Per decoder position: log p(target | encoder input, earlier targets) and whether it is the argmax."""
    logits = model.module.apply(variables, inputs, segment_ids=segment_ids, decoder_inputs=decoder_inputs,
                                decoder_segment_ids=decoder_segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def score_seq2seq_pairs(model, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int
                        ) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), greedy?) per (encoder ids, decoder target ids) of an
    encoder-decoder, batched by length: what lm-eval's ``hf`` backend computes for a seq2seq model
    (labels = the continuation, decoder inputs = the labels shifted right)."""
    variables = generate_lib.as_variables(params)
    multiple = generate_lib.batch_multiple()
    batch_size = -(-batch_size // multiple) * multiple
    start_id = model.config.decoder_start_token_id
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        enc_len = generate_lib.bucket(max(len(pairs[i][0]) for i in chunk), generate_lib.MIN_PROMPT_BUCKET)
        dec_len = generate_lib.bucket(max(len(pairs[i][1]) for i in chunk), generate_lib.MIN_PROMPT_BUCKET)
        enc = {k: np.zeros((batch_size, enc_len), np.int32) for k in ("inputs", "segment_ids")}
        dec = {k: np.zeros((batch_size, dec_len), np.int32) for k in ("decoder_inputs", "targets", "decoder_segment_ids")}
        for row, i in enumerate(chunk):
            context, continuation = list(pairs[i][0]), list(pairs[i][1])
            enc["inputs"][row, :len(context)], enc["segment_ids"][row, :len(context)] = context, 1
            n = len(continuation)
            dec["targets"][row, :n], dec["decoder_segment_ids"][row, :n] = continuation, 1
            dec["decoder_inputs"][row, :n] = [start_id] + continuation[:-1]
        logp, greedy = _seq2seq_token_logprobs(generate_lib.ByRepr(model), variables, **enc, **dec)
        logp, greedy = distributed.to_host(logp), distributed.to_host(greedy)
        for row, i in enumerate(chunk):
            n = len(pairs[i][1])
            results[i] = (float(logp[row, :n].sum()), bool(greedy[row, :n].all()))
    return results  # type: ignore[return-value]


def _lm_class():
    """`JaxtuneLM`, defined on first use so that lm-eval (an optional extra) is imported only then."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class JaxtuneLM(TemplateLM):
        def __init__(self, loaded, *, batch_size: int = 8, max_length: int | None = None, max_gen_toks: int = 256,
                     chat_template: str | None = None):
            super().__init__()
            self.loaded, self.tok = loaded, loaded.tokenizer
            self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
            self.max_length = max_length or DEFAULT_MAX_LENGTH
            self._chat_template = chat_template
            # lm-eval's TemplateLM encodes a seq2seq model's context and continuation separately
            self.seq2seq = bool(getattr(loaded.model, "is_encoder_decoder", False))
            self.backend = "seq2seq" if self.seq2seq else "causal"

        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        @property
        def prefix_token_id(self) -> int:
            return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tok, "_source", type(self.tok).__name__)).replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self._template() if chat_template else None

        def _template(self) -> str:
            from jaxtune import chat_loop

            if self._chat_template is None:
                self._chat_template = chat_loop.choose_template(None, self.tok, self.loaded.config)
            return self._chat_template

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            from jaxtune.data.chat import render_chat

            return render_chat(chat_history, self._template(), bos_token=getattr(self.tok, "bos_token", None),
                               eos_token=getattr(self.tok, "eos_token", None),
                               add_generation_prompt=add_generation_prompt)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            if self.seq2seq:  # `tokenizer(text)` of a T5 tokenizer ends in </s>; continuations go without it
                ids = encode_with_specials(self.tok, string)
                return ids if add_special_tokens is False else ids + [self.tok.eos_id]
            bos = getattr(self.tok, "bos_token", None)
            prefix = list(self.tok.text_prefix)
            if add_special_tokens is False or (add_special_tokens is None and bos and string.startswith(bos)):
                prefix = []
            return prefix + encode_with_specials(self.tok, string)

        def tok_decode(self, tokens: Sequence[int]) -> str:
            return self.tok.decode(list(tokens))

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            if self.seq2seq:  # the context is the encoder's (its last max_length tokens), the continuation the decoder's
                pairs = [(list(context)[-self.max_length:], list(continuation)[-self.max_length:])
                         for _, context, continuation in requests]
                return score_seq2seq_pairs(self.loaded.model, self.loaded.params, pairs, batch_size=self.batch_size)
            pairs = []
            for _, context_enc, continuation_enc in requests:
                whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
                cont = min(len(continuation_enc), len(whole) - 1)
                pairs.append((whole[:-cont], whole[-cont:]))
            return score_token_pairs(self.loaded.model, self.loaded.params, pairs, batch_size=self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owners = [], []
            for index, request in enumerate(requests):
                (string,) = request.args
                for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append((None, context, continuation))
                    owners.append(index)
            totals = [0.0] * len(requests)
            for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows)):
                totals[owner] += logp
            for request, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            eos_text = getattr(self.tok, "eos_token", None)
            outputs: list[str | None] = [None] * len(requests)
            groups: dict[tuple, list[int]] = {}
            for index, request in enumerate(requests):
                kwargs = dict(request.args[1])
                if kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0:
                    raise UserError("eval --harness: sampled generation (do_sample/temperature > 0) is not supported; "
                                    "jaxtune's harness backend decodes greedily as published numbers do")
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                if eos_text and eos_text not in until:
                    until.append(eos_text)
                max_gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                groups.setdefault((max_gen, tuple(until)), []).append(index)
            for (max_gen, until), indices in groups.items():
                if max_gen >= self.max_length and not self.seq2seq:
                    raise UserError(f"eval --harness: max_gen_toks {max_gen} must be below max_length {self.max_length}")
                # An encoder reads the whole max_length; a decoder-only context leaves room for the answer.
                context_len = self.max_length if self.seq2seq else self.max_length - max_gen
                prompts = [self.tok_encode(requests[i].args[0])[-context_len:] for i in indices]
                tokens = generate_lib.generate(self.loaded.model, self.loaded.params, prompts, max_new_tokens=max_gen,
                                               stop_tokens=(self.tok.eos_id,), pad_id=self.tok.pad_id,
                                               batch_size=self.batch_size)
                for i, out in zip(indices, tokens):
                    text = self.tok_decode(out)
                    for stop in until:
                        text = text.split(stop)[0]
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
            return outputs  # type: ignore[return-value]

    return JaxtuneLM


def harness_lm(loaded, **kwargs):
    """A `JaxtuneLM` (an lm-eval ``LM``) for an `inference.Loaded` model."""
    _require_lm_eval()
    return _lm_class()(loaded, **kwargs)


def max_length_of(loaded, hf_dir: str | None) -> int:
    """The context length lm-eval's ``hf`` backend would use: config.json's n_positions (T5 files),
    max_position_embeddings or n_ctx, the first one set."""
    directory = hub.local_path(hf_dir) if hf_dir else loaded.config.model.get("hf_dir")  # a Hub id: its snapshot
    config_json = Path(directory or "") / "config.json"
    if directory and config_json.is_file():
        hf_config = json.loads(config_json.read_text())
        value = next((hf_config[k] for k in ("n_positions", "max_position_embeddings", "n_ctx") if hf_config.get(k)), None)
        if value:
            return int(value)
    return int(getattr(loaded.model, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH)


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """lm-eval's TaskManager for `tasks` (a UserError names any it does not know), checked before a
    model is loaded. With `include_path` holding every task, lm-eval's own ~15k tasks are not indexed."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise UserError(f"--harness_include {include_path}: no such directory")
    if not tasks:
        raise UserError("--harness: name at least one lm-eval task")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--harness: unknown lm-eval task(s) {', '.join(unknown)}; add task YAMLs with "
                        "--harness_include DIR or see `lm-eval ls tasks`")
    return manager


def run_harness(lm, tasks: Sequence[str], *, include_path: str | None = None, manager=None,
                num_fewshot: int | None = None, limit: float | None = None, apply_chat_template: bool = False,
                system_instruction: str | None = None, seed: int = 1234) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on `lm`; returns its results dict (as lm-eval's CLI writes it)."""
    from lm_eval import simple_evaluate

    from jaxtune.rewards.ifeval_checkers import ensure_nltk_punkt

    manager = manager or task_manager(tasks, include_path)
    ensure_nltk_punkt()  # lm-eval's ifeval task calls NLTK itself: our punkt tables, never a download
    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           apply_chat_template=apply_chat_template, system_instruction=system_instruction,
                           random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                           log_samples=False)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``harness/<task>/<metric>`` -> value for every numeric metric of lm-eval's results dict."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in key:
                out[f"harness/{task}/{key.replace(',none', '')}"] = float(value)
    return out


def write_results_json(results: dict[str, Any], path: str | Path) -> Path:
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return path
