"""Evaluation: SQuAD normalisation/F1, few-shot prompts, log-likelihood scoring (loss and multiple
choice) against a direct forward pass, MC record validation, and eval during training without
recompiling the train step."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtune import evaluate, models, trainer, validation
from jaxtune.data import pipeline
from jaxtune.errors import UserError
from jaxtune.metrics import read_metrics
from tests.data.test_pipeline import CharTokenizer
from tests.helpers import tiny_config, write_sft_jsonl


@pytest.fixture(scope="module")
def tiny():
    model = models.build(models.get_config("llama", "tiny", vocab_size=CharTokenizer.vocab_size))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return model, params, CharTokenizer()


_APPLY = {}


def _direct_logp(model, params, prompt, continuation):
    """Sum of log p(continuation | prompt) from one forward pass (right padding: causal, so harmless)."""
    seq = prompt + continuation
    apply = _APPLY.setdefault(id(model), jax.jit(lambda p, x: model.apply({"params": p}, x)))
    logp = apply(params, jnp.asarray([seq + [0] * (32 - len(seq))]))
    logp = jax.nn.log_softmax(logp[0].astype(jnp.float32))
    return sum(float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(continuation))


def test_normalisation_and_token_f1():
    assert evaluate.normalize_answer("The  Cat, sat!") == "cat sat"
    assert evaluate.token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert evaluate.token_f1("", "") == 1.0 and evaluate.token_f1("dog", "") == 0.0
    s = evaluate.generative_scores(["The cat", "dog", "x y"], ["cat", "a cat", "y z"], ["a", "a", "b"])
    assert s["exact_match"] == pytest.approx(1 / 3) and s["exact_match/a"] == 0.5 and s["exact_match/b"] == 0.0
    assert s["f1"] == pytest.approx((1.0 + 0.0 + 0.5) / 3) and s["f1/b"] == 0.5


def test_few_shot_uses_other_examples_of_the_same_task():
    ex = [{"task": t, "prompt": f"q{i}=", "answer": f"a{i}"} for i, t in enumerate("xxxyy")]
    shots = evaluate.few_shot(ex, 2, seed=0)
    assert shots == evaluate.few_shot(ex, 2, seed=0)
    assert evaluate.few_shot(ex, 0, seed=0) == ex
    for i, e in enumerate(shots):
        blocks = e["prompt"].split("\n\n")
        assert blocks[-1] == ex[i]["prompt"]
        used = [b.split("=")[0] for b in blocks[:-1]]
        same_task = [f"q{j}" for j, o in enumerate(ex) if o["task"] == ex[i]["task"] and j != i]
        assert len(used) == min(2, len(same_task)) and set(used) <= set(same_task)


def test_loss_matches_direct_forward(tiny):
    model, params, tok = tiny
    examples = [{"prompt": "ab", "answer": "cde"}, {"prompt": "hello", "answer": "x"}, {"prompt": "q", "answer": "zz"}]
    scores = evaluate.loss_scores(model, params, tok, examples, seq_len=16, batch_size=2)
    total, count = 0.0, 0
    for e in examples:
        target = tok.encode(e["answer"]) + [tok.eos_id]
        total += _direct_logp(model, params, pipeline.encode_prompt(tok, e["prompt"]), target)
        count += len(target)
    assert scores["loss"] == pytest.approx(-total / count, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(np.exp(-total / count), rel=1e-5)


def test_multiple_choice_raw_and_length_normalised(tiny):
    model, params, tok = tiny
    ex = [{"task": "t", "prompt": "color:", "options": [" red", " blue green", " x"], "answer": 1},
          {"task": "u", "prompt": "n:", "options": ["1", "22"], "answer": 0}]
    scores = evaluate.multiple_choice_scores(model, params, tok, ex, seq_len=24, batch_size=4)
    raw, norm = [], []
    for e in ex:
        prompt = pipeline.encode_prompt(tok, e["prompt"])
        lp = np.array([_direct_logp(model, params, prompt, tok.encode(o)) for o in e["options"]])
        lengths = np.array([len(tok.encode(o)) for o in e["options"]])
        raw.append(float(np.argmax(lp) == e["answer"]))
        norm.append(float(np.argmax(lp / lengths) == e["answer"]))
    assert scores["mc/accuracy"] == np.mean(raw) and scores["mc/accuracy_norm"] == np.mean(norm)
    assert scores["mc/accuracy/t"] == raw[0] and scores["mc/accuracy_norm/u"] == norm[1]


@pytest.mark.parametrize("record, needle", [
    ({"prompt": "q", "options": ["a"], "answer": 0}, "at least two"),
    ({"prompt": "q", "options": ["a", "b"], "answer": 2}, "'answer'"),
    ({"prompt": "q", "options": ["a", "b"], "answer": "c"}, "'answer'"),
])
def test_multiple_choice_records_are_validated(tmp_path, record, needle):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "options": ["a", "b"], "answer": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=f"mc.jsonl:2: .*{needle}"):
        evaluate.load_multiple_choice(str(path))


def test_mc_rendering_puts_each_option_through_the_template(tmp_path):
    records = [{"question": "2+2", "options": ["3", "4"], "answer": 1, "_where": "f:1"}]
    out = evaluate.render_multiple_choice(records, [("Q: {question} A:", " {option}")], seed=0)
    assert out == [{"task": "default", "prompt": "Q: 2+2 A:", "options": [" 3", " 4"], "answer": 1, "where": "f:1"}]


def test_eval_config_validation(tmp_path):
    for key, value, needle in [("eval.num_shots", "(-1,)", "num_shots"), ("eval.mc_path", "nope.jsonl", "mc_path"),
                               ("eval.mc_templates", "(('{prompt}', 'x'),)", "option")]:
        with pytest.raises(UserError, match=needle):
            tiny_config(tmp_path, **{key: value})


def test_eval_during_training_never_recompiles_the_train_step(tmp_path, caplog):
    eval_path = write_sft_jsonl(tmp_path / "eval.jsonl", n=6)
    mc_path = tmp_path / "mc.jsonl"
    mc_path.write_text("".join(json.dumps({"prompt": f"reverse: cat dog {i} =", "options": [" dog cat", " cat dog"],
                                           "answer": 0}) + "\n" for i in range(3)))
    c = tiny_config(tmp_path, **{"train.steps": 4, "train.eval_every": 2, "data.eval_path": eval_path,
                                 "eval.batch_size": 8, "eval.max_new_tokens": 4, "eval.num_shots": "(0, 1)",
                                 "eval.mc_path": mc_path})
    jax.clear_caches()  # other tests' evals may have compiled the same shapes already
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        summary = trainer.train(c, tmp_path / "run")
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert sum("train_step" in m for m in compiles) == 1, compiles  # 3 evals (steps 0, 2, 4), one train compile
    # Eval functions compile once per bucket (0-shot and 1-shot prompt lengths), not once per eval.
    assert sum("_sample_loop" in m for m in compiles) == 2 and sum("_sequence_logprobs" in m for m in compiles) == 1
    rows = [r for r in read_metrics(tmp_path / "run") if "eval/loss" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert {"eval/exact_match", "eval/f1", "eval/1shot/exact_match", "eval/perplexity", "eval/mc/accuracy"} <= set(rows[0])
    saved = json.loads((tmp_path / "run" / "eval" / "step_4.json").read_text())
    assert saved["step"] == 4 and saved["metrics"]["loss"] == pytest.approx(summary.eval_after["loss"])


# ----------------------------------------------------------------------------- eval.tasks


def _eval_tasks_config(tmp_path, **tasks):
    from jaxtune import config as config_lib
    from tests.helpers import tiny_base_config, with_eval_tasks

    c = with_eval_tasks(tiny_base_config(write_sft_jsonl(tmp_path / "train.jsonl")), tmp_path)
    for name, task in tasks.items():
        c.eval.tasks[name] = task
    return c, config_lib


def test_eval_tasks_render_like_training_tasks(tmp_path):
    from jaxtune.eval_tasks import load_eval_tasks

    c, config_lib = _eval_tasks_config(tmp_path)
    random_mc = config_lib.eval_task_config(
        "multiple_choice", path=c.eval.tasks.heldout_mc.path, options_style="random", max_examples=4,
        fields={"text": "text", "options": "choices", "answer": "label"}, templates=(("{text}\n{options_}", "{answer}"),))
    c.eval.tasks.random_mc = random_mc
    validation.validate(c)
    tasks = {t.name: t for t in load_eval_tasks(c.eval.tasks, seed=0)}
    qa, mc, rand = tasks["heldout_qa"], tasks["heldout_mc"], tasks["random_mc"]
    assert (qa.metric, len(qa.examples)) == ("generative", 6)
    assert qa.examples[0] | {"where": ""} == {"task": "heldout_qa", "prompt": "reverse: red blue =", "answer": " blue red",
                                              "where": ""}
    assert mc.metric == "multiple_choice" and all(e["answer"] == 0 for e in mc.examples)  # text or index answers
    assert mc.examples[1]["options"] == [" moon sun", " sun moon", " blue"] and mc.examples[1]["prompt"] == "reverse: sun moon ="
    assert len(rand.examples) == 4  # max_examples
    for e in rand.examples:  # FLAN random option styles: each option's target (text or marker) is listed in the prompt
        assert len(set(e["options"])) == 3 and all(o in e["prompt"].split("\n", 1)[1] for o in e["options"])
    assert any(e["options"][0] == "(A)" or e["options"][0][0] in "A1a" for e in rand.examples)  # some marker style


@pytest.mark.parametrize("change, needle", [
    (lambda c, cl: setattr(c.data, "train_path", c.eval.tasks.heldout_qa.path), r"also trained on \(data.train_path\)"),
    (lambda c, cl: c.eval.tasks.heldout_qa.update(metric="bleu"), r"eval.tasks.heldout_qa.metric' is 'bleu'"),
    (lambda c, cl: c.eval.tasks.heldout_qa.update(format="chat"), "chat records are not evaluated"),
    (lambda c, cl: c.eval.tasks.update(bad=cl.task_config(path="x.jsonl")), r"'eval.tasks.bad' lacks 'max_examples'; build tasks with jaxtune.config.eval_task_config"),
])
def test_eval_tasks_config_errors(tmp_path, change, needle):
    c, config_lib = _eval_tasks_config(tmp_path)
    change(c, config_lib)
    with pytest.raises(UserError, match=needle):
        validation.validate(c)


def test_training_task_is_never_an_eval_task(tmp_path):
    c, config_lib = _eval_tasks_config(tmp_path)
    c.data.tasks.heldout_qa = config_lib.task_config(path=str(tmp_path / "train.jsonl"))
    with pytest.raises(UserError, match="'heldout_qa' is also a training task"):
        validation.validate(c)
    del c.data.tasks["heldout_qa"]
    c.data.tasks.qa = config_lib.task_config(path=c.eval.tasks.heldout_qa.path, fields={"prompt": "q", "response": "a"})
    with pytest.raises(UserError, match=r"eval.tasks.heldout_qa.path'.*also trained on \(data.tasks.qa\)"):
        validation.validate(c)
    # the same TFDS dataset is held out when its split differs
    c.data.tasks.qa = config_lib.task_config(source="tfds", path="squad", split="train")
    c.eval.tasks.heldout_qa.update(source="tfds", path="squad", split="validation")
    validation.validate(c)


def test_eval_task_records_are_checked(tmp_path):
    from jaxtune.eval_tasks import load_eval_task

    c, config_lib = _eval_tasks_config(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a", "choices": ["x", "x"], "label": 0}) + "\n")
    task = c.eval.tasks.heldout_mc
    task.path = str(bad)
    with pytest.raises(UserError, match=r"bad.jsonl:1: field 'options' repeats an option"):
        load_eval_task("heldout_mc", task, seed=0)
    task.on_error = "skip"
    with pytest.raises(UserError, match=r"'eval.tasks.heldout_mc': no examples"):
        load_eval_task("heldout_mc", task, seed=0)
    task.update(path=c.eval.tasks.heldout_qa.path.replace("qa", "mc"), on_error="error", templates=(("{text} {answer}", "{answer}"),))
    with pytest.raises(UserError, match="the prompt changes with the answer"):
        load_eval_task("heldout_mc", task, seed=0)
