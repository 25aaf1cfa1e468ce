"""Evaluation: held-out loss/perplexity, multiple-choice log-likelihood, generative EM/F1, few-shot,
and IFEval-style instruction following (strict/loose, prompt/instruction level).

The model runs in two jitted functions, each compiled once per (model, bucketed shape) and
separate from the train step: `_sequence_logprobs` (teacher-forced log-likelihood per row, fixed
[eval.batch_size, data.seq_len] batches) and the KV-cache sampler (generate.py).

Multiple choice scores each option by the log-likelihood of its tokens after the prompt: raw
(sum) and length-normalised (mean per option token); accuracy is reported for both.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import string
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import batch as batch_lib, distributed, generate as generate_lib, paths
from jaxtune.data import ifeval, pipeline, templates as templates_lib
from jaxtune.data.flan import few_shot_prompt
from jaxtune.data.sources import JsonlSource
from jaxtune.errors import UserError
from jaxtune.eval_tasks import EvalTask, load_eval_tasks
from jaxtune.logprobs import DEFAULT_CHUNK, head_token_stats, masked_sequence_sums, model_token_stats
from jaxtune.rewards.instructions import as_constraints, satisfied, satisfied_loose

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower-case, no punctuation/articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between the normalised bags of words (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _with_per_task(name: str, values: Sequence[float], tasks: Sequence[str] | None) -> dict[str, float]:
    scores = {name: float(np.mean(values)) if len(values) else 0.0}
    if tasks is not None:
        per_task: dict[str, list[float]] = defaultdict(list)
        for task, value in zip(tasks, values):
            per_task[task].append(value)
        for task, task_values in sorted(per_task.items()):
            scores[f"{name}/{task}"] = float(np.mean(task_values))
    return scores


def generative_scores(
    predictions: Sequence[str], references: Sequence[str], tasks: Sequence[str] | None = None
) -> dict[str, float]:
    """`exact_match` and `f1` overall plus `exact_match/<task>`, `f1/<task>`, each in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    pairs = list(zip(predictions, references))
    hits = [float(normalize_answer(p) == normalize_answer(r)) for p, r in pairs]
    return {**_with_per_task("exact_match", hits, tasks), **_with_per_task("f1", [token_f1(p, r) for p, r in pairs], tasks)}


INSTRUCTION_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                       "inst_level_loose_acc")


def instruction_scores(responses: Sequence[str], constraints: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, float]:
    """IFEval's four numbers (Zhou et al. 2023) for responses to prompts with checked constraints.

    ``prompt_level_*_acc``: the fraction of prompts whose every constraint holds;
    ``inst_level_*_acc``: the fraction of all constraints (over all prompts) that hold. *strict*
    checks the response as generated; *loose* counts a constraint as held when it holds on any of
    IFEval's eight variants of the response (`rewards.instructions.loose_variants`: the response,
    it without its first line, its last line or both, and each of those four with every ``*``
    removed), which forgives a preamble ("Sure, here it is:"), a closing remark and markdown
    emphasis. Also ``inst_level_strict_acc/<type>`` and ``inst_level_loose_acc/<type>`` per
    constraint type. A blank response satisfies nothing (as in IFEval). Names as lm-eval-harness's.
    """
    if len(responses) != len(constraints):
        raise ValueError(f"{len(responses)} responses for {len(constraints)} constraint lists")
    scores: dict[str, float] = {}
    for mode, check in (("strict", satisfied), ("loose", satisfied_loose)):
        held = [check(text, cs) for text, cs in zip(responses, constraints)]
        flat = [h for row in held for h in row]
        types = [c["type"] for cs in constraints for c in cs]
        scores[f"prompt_level_{mode}_acc"] = float(np.mean([all(row) for row in held])) if held else 0.0
        per_type = _with_per_task(f"inst_level_{mode}_acc", [float(h) for h in flat], types)
        scores.update(per_type)
    return scores


def score_responses_file(path: str, *, prompts: str | None = None) -> dict[str, float]:
    """Scores of precomputed responses (no model): each JSONL record carries a ``response``.

    Instruction records (``constraints``, or IFEval's ``instruction_id_list`` + ``kwargs``) get
    IFEval's four numbers and per-id accuracies; with `prompts` (IFEval's ``input_data.jsonl``)
    the records may be Google's ``input_response_data`` (``prompt``, ``response``), joined on the
    prompt text as Google's evaluation does. Records with an ``answer`` get exact match / F1
    (per ``task`` when present)."""
    by_prompt = {}
    if prompts:
        source = JsonlSource(prompts)
        for i in range(len(source)):
            record = source[i]
            by_prompt[record.get("prompt")] = record
    source = JsonlSource(path)
    responses, constraints, answers, tasks = [], [], [], []
    for i in range(len(source)):
        record = source[i]
        where = record["_where"]
        response = record.get(ifeval.RESPONSE_FIELD)
        if not isinstance(response, str):
            raise UserError(f"{where}: field 'response' must be a string (the response to score), got {response!r}")
        if by_prompt and not ifeval.is_ifeval_record(record) and "constraints" not in record:
            if record.get("prompt") not in by_prompt:
                raise UserError(f"{where}: prompt {str(record.get('prompt'))[:60]!r} is not in --prompts {prompts}")
            record = {**by_prompt[record["prompt"]], **record}
        if record.get("constraints") is not None or ifeval.is_ifeval_record(record):
            value = record["constraints"] if record.get("constraints") is not None else \
                ifeval.constraints_from_ifeval(record, where)
            constraints.append(as_constraints(value, f"{where}: instructions"))
        elif isinstance(record.get("answer"), str):
            answers.append(record["answer"])
            tasks.append(str(record.get("task", pipeline.DEFAULT_TASK)))
        else:
            raise UserError(f"{where}: expected IFEval fields (instruction_id_list + kwargs, or constraints; "
                            "--prompts for Google's {prompt, response} files) or an 'answer' to compare with")
        responses.append(response)
    if constraints and answers:
        raise UserError(f"{path}: mixes instruction records and answer records; score them as two files")
    if not responses:
        raise UserError(f"{path}: no records")
    if constraints:
        return instruction_scores(responses, constraints)
    return generative_scores(responses, answers, tasks)


# ----------------------------------------------------------------------------- log-likelihood


def is_encoder_decoder(model) -> bool:
    """Whether `model` (a module or a PEFT-wrapped one) takes its prompt in an encoder (T5)."""
    return bool(getattr(model, "is_encoder_decoder", False))


def prompt_ids(model, tokenizer, prompt: str) -> list[int]:
    """A prompt's ids as the model was trained on them: BOS + prompt, or for an encoder-decoder its
    encoder input (prompt + </s>)."""
    return pipeline.tokenize_prompts(tokenizer, [prompt], seq2seq=is_encoder_decoder(model))[0]


@functools.partial(jax.jit, static_argnames=("model", "logits_chunk"))
def _sequence_logprobs(model, variables, batch, logits_chunk):
    """Per row: summed log p(target) over the loss mask, masked token count, argmax hits.

    The LM head runs `logits_chunk` positions at a time, as in training (jaxtune/logprobs.py)."""
    if "decoder_inputs" in batch:  # an encoder-decoder: log p(targets | encoder input)
        hidden = model.module.apply(
            variables, batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
            decoder_inputs=batch["decoder_inputs"], decoder_positions=batch["decoder_positions"],
            decoder_segment_ids=batch["decoder_segment_ids"], method="hidden_states")
        stats = head_token_stats(lambda h: model.module.apply(variables, h, method="logits_from_hidden"), hidden,
                                 batch["targets"], chunk=logits_chunk)
    else:
        stats = model_token_stats(model.module, variables, batch["inputs"], batch["targets"],
                                  positions=batch["positions"], segment_ids=batch["segment_ids"], chunk=logits_chunk)
    logp, count = masked_sequence_sums(stats.logp, batch["loss_mask"])
    hits = stats.correct * (batch["loss_mask"] > 0)
    return logp, count, jnp.sum(hits, -1)


def score_continuations(
    model, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, seq_len: int, batch_size: int,
    where: Sequence[str] | None = None, logits_chunk: int = DEFAULT_CHUNK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sum log p, token count, greedy hits) of each continuation given its prompt, as [N] arrays.

    Rows are padded to [batch_size, seq_len] so every call reuses one compile; a continuation
    cut by seq_len is scored on the tokens that fit, one that does not fit at all is an error.
    """
    seq2seq = is_encoder_decoder(model)
    keys = batch_lib.SEQ2SEQ_BATCH_KEYS if seq2seq else batch_lib.BATCH_KEYS
    rows = []
    for i, (prompt, continuation) in enumerate(pairs):
        if seq2seq:  # the prompt is the encoder's, the continuation the decoder's
            row = pipeline.seq2seq_row(prompt, continuation, decoder_start_id=model.config.decoder_start_token_id,
                                       seq_len=seq_len)
        else:
            example = pipeline.tokenize_pair(prompt, continuation, seq_len=seq_len, truncation="truncate")
            row = None if example is None else pipeline.pad_example(example, seq_len)
        if row is None:
            label = where[i] if where else f"eval example {i}"
            raise UserError(f"{label}: the prompt leaves no room for the scored text within data.seq_len={seq_len}")
        rows.append(row)
    multiple = generate_lib.batch_multiple()
    batch_size = -(-batch_size // multiple) * multiple
    variables = generate_lib.as_variables(params)
    results = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        chunk += [{k: np.zeros(seq_len, np.int32) for k in keys}] * (batch_size - len(chunk))
        batch = {k: np.stack([r[k] for r in chunk]) for k in keys}
        out = _sequence_logprobs(generate_lib.ByRepr(model), variables, batch, logits_chunk)
        results.append(np.stack([distributed.to_host(x) for x in out])[:, : min(batch_size, len(rows) - start)])
    if not results:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    logp, count, hits = np.concatenate(results, axis=1)
    return logp, count, hits


def loss_scores(model, params, tokenizer, examples: Sequence[Mapping[str, str]], *, seq_len: int, batch_size: int,
                logits_chunk: int = DEFAULT_CHUNK) -> dict[str, float]:
    """Token-weighted loss, perplexity and next-token accuracy on prompt -> answer + EOS (as trained)."""
    pairs = [(prompt_ids(model, tokenizer, e["prompt"]), tokenizer.encode(e["answer"]) + [tokenizer.eos_id])
             for e in examples]
    logp, count, hits = score_continuations(model, params, pairs, seq_len=seq_len, batch_size=batch_size,
                                            logits_chunk=logits_chunk)
    tokens = max(float(count.sum()), 1.0)
    loss = -float(logp.sum()) / tokens
    return {"loss": loss, "perplexity": float(np.exp(loss)), "token_accuracy": float(hits.sum()) / tokens}


def multiple_choice_scores(
    model, params, tokenizer, examples: Sequence[Mapping[str, Any]], *, seq_len: int, batch_size: int,
    prefix: str = "mc/", per_task: bool = True, logits_chunk: int = DEFAULT_CHUNK,
) -> dict[str, float]:
    """`mc/accuracy` (argmax of summed option log-likelihood), `mc/accuracy_norm` (per-token mean), per task."""
    pairs, where, owner = [], [], []
    for i, e in enumerate(examples):
        prompt = prompt_ids(model, tokenizer, e["prompt"])
        for option in e["options"]:
            pairs.append((prompt, tokenizer.encode(option)))
            where.append(e.get("where", f"multiple-choice example {i}"))
            owner.append(i)
    logp, count, _ = score_continuations(model, params, pairs, seq_len=seq_len, batch_size=batch_size, where=where,
                                         logits_chunk=logits_chunk)
    owner = np.asarray(owner)
    raw, norm = [], []
    for i, e in enumerate(examples):
        option_logp, option_count = logp[owner == i], np.maximum(count[owner == i], 1)
        raw.append(float(np.argmax(option_logp) == e["answer"]))
        norm.append(float(np.argmax(option_logp / option_count) == e["answer"]))
    tasks = [e["task"] for e in examples] if per_task else None
    return {**_with_per_task(f"{prefix}accuracy", raw, tasks), **_with_per_task(f"{prefix}accuracy_norm", norm, tasks)}


# ----------------------------------------------------------------------------- eval sets


def load_multiple_choice(path: str) -> list[dict]:
    """Multiple-choice records from JSONL: template fields + `options` (>= 2 strings) + `answer`
    (the correct option's index or text) + optional `task`."""
    source = JsonlSource(path)
    records = []
    for i in range(len(source)):
        record = source[i]
        where, options, answer = record["_where"], record.get("options"), record.get("answer")
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise UserError(f"{where}: 'options' must be a list of at least two strings, got {options!r}")
        if isinstance(answer, str) and answer in options:
            answer = options.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
            raise UserError(f"{where}: 'answer' must be an option's index (0..{len(options) - 1}) or its text, got {answer!r}")
        records.append({**record, "answer": answer})
    return records


def render_multiple_choice(records: Sequence[dict], task_templates: Sequence[templates_lib.Template], *, seed: int) -> list[dict]:
    """Prompt from a template's input pattern; each option through its target pattern (field `option`)."""
    out = []
    for index, record in enumerate(records):
        fields = {k: v for k, v in record.items() if k not in ("options", "answer", "_where")}
        rendered = [
            templates_lib.render_example(task_templates, {**fields, "option": option}, seed=seed, index=index)
            for option in record["options"]
        ]
        out.append({
            "task": record.get("task", pipeline.DEFAULT_TASK), "prompt": rendered[0][0],
            "options": [target for _, target in rendered], "answer": record["answer"], "where": record["_where"],
        })
    return out


def few_shot(examples: Sequence[Mapping[str, str]], num_shots: int, *, seed: int, separator: str = "\n\n",
             target_separator: str = "") -> list[dict]:
    """Each example's prompt preceded by `num_shots` solved examples of the same task (never itself),
    drawn deterministically from (seed, index): FLAN's k-shot format on held-out templates."""
    if num_shots == 0:
        return [dict(e) for e in examples]
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_task[e["task"]].append(i)
    out = []
    for i, e in enumerate(examples):
        others = [j for j in by_task[e["task"]] if j != i]
        rng = np.random.default_rng([seed, i, num_shots])
        shots = [(examples[j]["prompt"], examples[j]["answer"]) for j in rng.permutation(others)[:num_shots]]
        out.append({**e, "prompt": few_shot_prompt(shots, e["prompt"], separator=separator, target_separator=target_separator)})
    return out


@dataclasses.dataclass
class EvalSet:
    """Rendered held-out examples: generative (task, prompt, answer), multiple choice, named eval tasks."""

    generative: list[dict] = dataclasses.field(default_factory=list)
    multiple_choice: list[dict] = dataclasses.field(default_factory=list)
    tasks: list[EvalTask] = dataclasses.field(default_factory=list)  # eval.tasks, scored under their names
    harness: tuple[str, ...] = ()  # eval.harness: lm-evaluation-harness task names

    def __bool__(self) -> bool:
        return bool(self.generative or self.multiple_choice or self.tasks or self.harness)


def build_eval_set(eval_records, eval_templates, eval_cfg, *, seed: int) -> EvalSet:
    """The eval set from the data section's held-out records plus `eval.mc_path` and `eval.tasks`."""
    generative = pipeline.render_eval_set(eval_records, eval_templates, seed=seed) if eval_records else []
    mc = []
    if eval_cfg.mc_path:
        templates = [tuple(t) for t in eval_cfg.mc_templates]
        mc = render_multiple_choice(load_multiple_choice(eval_cfg.mc_path), templates, seed=seed)
    harness_tasks = tuple(t.strip() for t in (eval_cfg.get("harness") or "").split(",") if t.strip())
    return EvalSet(generative, mc, load_eval_tasks(eval_cfg.get("tasks") or {}, seed=seed), harness_tasks)


def run(model, params, tokenizer, eval_set: EvalSet, eval_cfg, *, seq_len: int, seed: int, show: int = 0, printer=print,
        logits_chunk: int = DEFAULT_CHUNK) -> dict[str, float]:
    """Every configured evaluation -> flat metrics (`loss`, `exact_match`, `2shot/f1`, `mc/accuracy`,
    and per eval task `<task>/exact_match`, `2shot/<task>/f1`, `<task>/accuracy`...)."""
    scores: dict[str, float] = {}
    kw = dict(seq_len=seq_len, batch_size=eval_cfg.batch_size, logits_chunk=logits_chunk)
    shown = dict(seed=seed, show=show, printer=printer)
    if eval_set.generative:
        scores.update(_generative_metrics(model, params, tokenizer, eval_set.generative, eval_cfg, **kw, **shown))
    if eval_set.multiple_choice:
        scores.update(multiple_choice_scores(model, params, tokenizer, eval_set.multiple_choice, **kw))
    for task in eval_set.tasks:
        if task.metric == "multiple_choice":
            scores.update(multiple_choice_scores(model, params, tokenizer, task.examples, **kw, prefix=f"{task.name}/",
                                                 per_task=False))
        elif task.metric == "instructions":
            scores.update(_instruction_metrics(model, params, tokenizer, task, eval_cfg, show=show, printer=printer))
        else:
            scores.update(_generative_metrics(model, params, tokenizer, task.examples, eval_cfg, **kw, **shown,
                                              name=task.name, separators=(task.separator, task.target_separator)))
    if eval_set.harness:
        scores.update(_harness_metrics(model, params, tokenizer, eval_set.harness, eval_cfg, seq_len=seq_len,
                                       seed=seed))
    return scores


def _harness_metrics(model, params, tokenizer, tasks, eval_cfg, *, seq_len: int, seed: int) -> dict[str, float]:
    """`harness/<task>/<metric>` of lm-evaluation-harness tasks on the model being trained (context: data.seq_len)."""
    from jaxtune import harness

    loaded = harness.InMemoryModel(model, params, tokenizer)
    lm = harness.harness_lm(loaded, batch_size=eval_cfg.batch_size, max_length=seq_len,
                            max_gen_toks=eval_cfg.max_new_tokens)
    results = harness.run_harness(lm, tasks, include_path=eval_cfg.get("harness_include") or None,
                                  num_fewshot=None if eval_cfg.get("harness_num_fewshot", -1) < 0
                                  else eval_cfg.harness_num_fewshot,
                                  limit=eval_cfg.get("harness_limit") or None, seed=seed)
    return harness.flat_metrics(results)


def _generative_metrics(model, params, tokenizer, examples, eval_cfg, *, seq_len: int, batch_size: int, seed: int,
                        show: int, printer, name: str = "", separators: tuple[str, str] = ("\n\n", ""),
                        logits_chunk: int = DEFAULT_CHUNK) -> dict[str, float]:
    """Loss and zero/k-shot EM/F1 of one generative set: `loss`, `2shot/f1`... (per record task), or
    under a named eval task `<name>/loss`, `2shot/<name>/f1`... (the whole set)."""
    scores: dict[str, float] = {}
    prefix = f"{name}/" if name else ""
    if eval_cfg.loss:
        result = loss_scores(model, params, tokenizer, examples, seq_len=seq_len, batch_size=batch_size,
                             logits_chunk=logits_chunk)
        scores.update({prefix + metric: value for metric, value in result.items()})
    if eval_cfg.generative:
        for k in eval_cfg.num_shots:
            prompted = few_shot(examples, k, seed=seed, separator=separators[0], target_separator=separators[1])
            predictions = generate_answers(model, params, tokenizer, prompted, eval_cfg)
            tasks = None if name else [e["task"] for e in prompted]
            result = generative_scores(predictions, [e["answer"] for e in prompted], tasks)
            scores.update({(f"{k}shot/" if k else "") + prefix + metric: value for metric, value in result.items()})
            if k == eval_cfg.num_shots[0]:
                _show(prompted, predictions, show, printer)
    return scores


def _instruction_metrics(model, params, tokenizer, task: EvalTask, eval_cfg, *, show: int, printer) -> dict[str, float]:
    """`<task>/prompt_level_strict_acc`... of greedy responses (zero-shot: there are no reference
    responses to show); bad records left out are counted (`<task>/skipped_records`)."""
    responses = generate_answers(model, params, tokenizer, task.examples, eval_cfg)
    result = instruction_scores(responses, [e["constraints"] for e in task.examples])
    scores = {f"{task.name}/{metric}": value for metric, value in result.items()}
    if task.skipped_records:
        scores[f"{task.name}/skipped_records"] = float(task.skipped_records)
        printer(f"jaxtune: eval task {task.name!r}: {task.skipped_records} bad records skipped (on_error='skip')")
    for example, response in list(zip(task.examples, responses))[:show]:
        mark = "ok " if all(satisfied(response, example["constraints"])) else "bad"
        kinds = ", ".join(c["type"] for c in example["constraints"])
        printer(f"  [{mark}] {example['prompt']!r} -> {response!r} ({kinds})")
    return scores


def generate_answers(model, params, tokenizer, examples: Sequence[Mapping[str, str]], eval_cfg) -> list[str]:
    """Greedy answers (KV-cache sampler), stopped at EOS and at any of `eval.stop_strings`."""
    prompts = pipeline.tokenize_prompts(tokenizer, [e["prompt"] for e in examples], seq2seq=is_encoder_decoder(model))
    outputs = generate_lib.generate(
        model, params, prompts, max_new_tokens=eval_cfg.max_new_tokens, stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id, batch_size=eval_cfg.batch_size,
    )
    return [generate_lib.decode_completion(tokenizer.decode, o, eval_cfg.stop_strings) for o in outputs]


def _show(examples, predictions, show: int, printer) -> None:
    for example, prediction in list(zip(examples, predictions))[:show]:
        mark = "ok " if normalize_answer(prediction) == normalize_answer(example["answer"]) else "bad"
        printer(f"  [{mark}] {example['prompt']!r} -> {prediction!r} (expected {example['answer']!r})")


def write_results(path: str | Path, scores: Mapping[str, float], **info: Any) -> Path:
    """Scores (plus e.g. step) as a JSON file, for scripts comparing runs."""
    path = paths.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**info, "metrics": dict(scores)}, indent=2, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------- preference pairs


def pair_sequence_scores(model, params, arrays: Mapping[str, np.ndarray], *, batch_size: int,
                         logits_chunk: int = DEFAULT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(summed log p, trained-token count), each [N, 2], of padded [N, 2, T] pairs (held-out pair eval;
    an encoder-decoder's pairs carry both streams).

    `params` are the variables to score with: the policy, or a reference ({"params": start weights},
    or a PEFT base without adapters). Fixed [batch, 2, T] calls, the last one filled with repeats."""
    n = len(arrays["inputs"])
    multiple = generate_lib.batch_multiple()
    batch_size = -(-batch_size // multiple) * multiple
    pairs_per_call = max(1, batch_size // 2)
    if multiple > 1:
        pairs_per_call = -(-pairs_per_call // multiple) * multiple
    variables = generate_lib.as_variables(params)
    logps, counts = [], []
    for start in range(0, n, pairs_per_call):
        take = np.minimum(np.arange(start, start + pairs_per_call), n - 1)  # the last call repeats the last pair
        rows = {k: arrays[k][take].reshape(-1, arrays[k].shape[-1]) for k in batch_lib.row_keys(arrays)}
        logp, count, _ = _sequence_logprobs(generate_lib.ByRepr(model), variables, rows, logits_chunk)
        keep = min(pairs_per_call, n - start)
        logps.append(distributed.to_host(logp).reshape(-1, 2)[:keep])
        counts.append(distributed.to_host(count).reshape(-1, 2)[:keep])
    return np.concatenate(logps), np.concatenate(counts)
