"""`jaxtune generate|eval --workdir` on PEFT runs: the adapters-only checkpoint is restored onto the
re-created base (quantised for QLoRA; effective prefixes for prefix tuning), so the CLI samples and
scores exactly what training evaluated."""

import json

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from jaxtune import cli, models, sharding, trainer
from jaxtune.data import pipeline
from jaxtune.data.datasets import TOKENIZER_FILE
from jaxtune.data.tokenizers import load_tokenizer
from jaxtune.generate import decode_completion, generate
from jaxtune.metrics import read_metrics
from tests import helpers

PROMPT = "reverse: cat dog ="
RUNS = {
    "qlora": {"peft.method": "lora", "peft.quantize": "nf4", "peft.targets": "all-linear", "peft.rank": 4},
    "lora": {"peft.method": "lora", "peft.targets": "q,v", "peft.rank": 4},
    "prefix": {"peft.method": "prefix", "peft.prefix_length": 3, "peft.prefix_projection": 8},
}


def _train(tmp_path, overrides):
    """A 3-step PEFT run that evaluates the loss on a small held-out file at steps 0 and 3."""
    evals = helpers.write_sft_jsonl(tmp_path / "eval.jsonl", n=4)
    c = helpers.tiny_config(tmp_path, **overrides, **{
        "train.steps": 3, "train.checkpoint_every": 3, "optim.lr": 3e-2, "optim.warmup_steps": 0,
        "data.eval_path": str(evals), "eval.batch_size": 4, "eval.generative": False, "eval.show_examples": 0})
    workdir = tmp_path / "run"
    trainer.train(c, workdir)
    return c, workdir


def _stdout(capsys, argv):
    capsys.readouterr()
    assert cli.main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("run", [
    "lora",  # QLoRA (quantised base) and prefix (effective prefixes) take the same path, ~25 s each:
    pytest.param("qlora", marks=pytest.mark.slow), pytest.param("prefix", marks=pytest.mark.slow),
])
def test_cli_generates_and_evaluates_with_base_plus_adapters(run, tmp_path, capsys):
    c, workdir = _train(tmp_path, RUNS[run])
    # Expected, built here: the base as training built it (the plain model's seeded init, quantised
    # when QLoRA) + the checkpoint's adapters.
    tok = load_tokenizer(workdir / TOKENIZER_FILE)
    model_config = trainer.model_config_from(c, vocab_size=tok.vocab_size)
    plain = models.build(model_config)
    base = sharding.unbox(jax.jit(plain.init)(jax.random.key(c.seed), jnp.zeros((1, 1), jnp.int32))["params"])
    base = trainer.prepare_base(base, trainer.peft_spec(c))
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        adapters = manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]
    tokens = generate(trainer.build_model(c, model_config), trainer.variables_for(adapters, base),
                      pipeline.tokenize_prompts(tok, [PROMPT]), max_new_tokens=6, stop_tokens=(tok.eos_id,),
                      pad_id=tok.pad_id)[0]
    out = _stdout(capsys, ["generate", "--workdir", str(workdir), "--prompt", PROMPT, "--max_new_tokens", "6"])
    assert out == decode_completion(tok.decode, tokens) + "\n"

    # `jaxtune eval` scores what the trainer's final eval scored (same base + adapters, same numbers),
    # not what it scored at step 0 (LoRA: B = 0, the base model).
    evals = {r["step"]: r["eval/loss"] for r in read_metrics(workdir) if "eval/loss" in r}
    _stdout(capsys, ["eval", "--workdir", str(workdir)])
    loss = json.loads((workdir / "eval_results.json").read_text())["metrics"]["loss"]
    assert loss == pytest.approx(evals[3], rel=1e-5) and abs(loss - evals[0]) > 1e-3


def test_harness_on_a_lora_workdir(tmp_path, capsys):
    """`jaxtune eval --workdir W --harness`: lm-eval tasks on base + adapters; results JSON in the
    workdir, metrics in metrics.jsonl, and log-likelihoods of the adapted model (built here)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from jaxtune import harness, inference
    from tests.test_harness_training import write_reverse_task

    c, workdir = _train(tmp_path, RUNS["lora"])
    tok = load_tokenizer(workdir / TOKENIZER_FILE)
    model_config = trainer.model_config_from(c, vocab_size=tok.vocab_size)
    plain = models.build(model_config)
    base = sharding.unbox(jax.jit(plain.init)(jax.random.key(c.seed), jnp.zeros((1, 1), jnp.int32))["params"])
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        adapters = manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]
    whole = list(tok.text_prefix) + tok.encode("reverse: cat dog = dog cat")  # lm-eval splits the whole text's tokens
    continuation = whole[len(tok.text_prefix) + len(tok.encode("reverse: cat dog =")):]
    tokens = jnp.asarray([whole])
    logits = trainer.build_model(c, model_config).apply(trainer.variables_for(adapters, base), tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)[0, -len(continuation):]
    expected = float(jnp.take_along_axis(logp, tokens[0, -len(continuation):, None], -1).sum())
    lm = harness.harness_lm(inference.from_workdir(str(workdir)), batch_size=2, max_length=64)
    [(got, _)] = lm.loglikelihood([Instance("loglikelihood", {}, ("reverse: cat dog =", " dog cat"), 0)])
    assert got == pytest.approx(expected, abs=1e-4)

    tasks = write_reverse_task(tmp_path / "tasks")
    out = _stdout(capsys, ["eval", "--workdir", str(workdir), "--harness", "rev_mc", "--harness_include",
                           str(tasks), "--harness_max_length", "64", "--limit", "2"])
    results = json.loads((workdir / "harness_results.json").read_text())
    acc = results["results"]["rev_mc"]["acc,none"]
    assert f"harness/rev_mc/acc: {acc:.4f}" in out
    rows = [r for r in read_metrics(workdir) if "eval/harness/rev_mc/acc" in r]
    assert rows[-1]["eval/harness/rev_mc/acc"] == acc and rows[-1]["step"] == 3
