"""`jaxtune generate|eval --workdir` on PEFT runs: the adapters-only checkpoint is restored onto the
re-created base (quantised for QLoRA; effective prefixes for prefix tuning), so the CLI samples and
scores exactly what training evaluated."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import cli, inference, models, sharding, trainer
from jaxtune.data import pipeline
from jaxtune.generate import decode_completion, generate
from jaxtune.metrics import read_metrics
from tests import helpers

PROMPT = "reverse: cat dog ="
RUNS = {
    "qlora": {"peft.method": "lora", "peft.quantize": "nf4", "peft.targets": "all-linear", "peft.rank": 4},
    "prefix": {"peft.method": "prefix", "peft.prefix_length": 3, "peft.prefix_projection": 8},
}


def _train(tmp_path, overrides):
    """A 3-step PEFT run that evaluates (loss + generation) on a small held-out file at steps 0 and 3."""
    evals = helpers.write_sft_jsonl(tmp_path / "eval.jsonl", n=4)
    c = helpers.tiny_config(tmp_path, **overrides, **{
        "train.steps": 3, "train.checkpoint_every": 3, "optim.lr": 3e-2, "optim.warmup_steps": 0,
        "data.eval_path": str(evals), "eval.batch_size": 4, "eval.max_new_tokens": 4, "eval.show_examples": 0})
    workdir = tmp_path / "run"
    trainer.train(c, workdir)
    return c, workdir


def _stdout(capsys, argv):
    capsys.readouterr()
    assert cli.main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("run", list(RUNS))
def test_cli_generates_and_evaluates_with_base_plus_adapters(run, tmp_path, capsys):
    c, workdir = _train(tmp_path, RUNS[run])
    loaded = inference.from_workdir(str(workdir))
    assert loaded.model.config.peft is not None and loaded.step == 3

    # The base as training built it: the plain model's seeded init (quantised when QLoRA).
    plain = models.build(loaded.model.config.replace(peft=None))
    base = sharding.unbox(jax.jit(plain.init)(jax.random.key(c.seed), jnp.zeros((1, 1), jnp.int32))["params"])
    base = trainer.quantize_base(base, loaded.model.config.peft)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params["params"]), jax.device_get(base))

    tok = loaded.tokenizer
    prompts = pipeline.tokenize_prompts(tok, [PROMPT])
    tokens = generate(loaded.model, loaded.params, prompts, max_new_tokens=6, stop_tokens=(tok.eos_id,),
                      pad_id=tok.pad_id)[0]
    out = _stdout(capsys, ["generate", "--workdir", str(workdir), "--prompt", PROMPT, "--max_new_tokens", "6"])
    assert out == decode_completion(tok.decode, tokens) + "\n"

    x = jnp.asarray(prompts)
    adapted = loaded.model.apply(loaded.params, x)
    assert float(jnp.abs(adapted - loaded.model.apply({"params": base}, x)).max()) > 1e-3  # the adapters matter

    # `jaxtune eval` scores what the trainer's final eval scored (same base + adapters, same numbers).
    final = next(r for r in read_metrics(workdir) if r["step"] == 3 and "eval/loss" in r)
    _stdout(capsys, ["eval", "--workdir", str(workdir)])
    scores = json.loads((workdir / "eval_results.json").read_text())["metrics"]
    assert scores["loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
    assert scores["exact_match"] == final["eval/exact_match"]
