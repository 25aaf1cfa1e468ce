"""The quickstart config end to end, shortened: held-out exact match logged before and after."""

import numpy as np
import pytest

from jaxtune import trainer, validation
from jaxtune.metrics import read_metrics


def test_quickstart_short_run(tmp_path, capsys):
    c = validation.load_config(
        "configs/quickstart.py:steps=30",
        ["data.num_train_examples=3000", "data.num_eval_examples=44", "train.log_every=10", "train.progress_bar=false",
         "mesh.data=8"],
    )
    summary = trainer.train(c, tmp_path / "qs")
    out = capsys.readouterr().out
    assert "held-out exact match before training: 0.0%" in out
    assert "before ->" in out and "after training" in out
    assert "expected" in out  # a few prompts with the model's greedy answers
    rows = read_metrics(tmp_path / "qs")
    evals = [r for r in rows if "eval/exact_match" in r]
    assert [r["step"] for r in evals] == [0, 30]
    assert evals[0]["eval/exact_match"] == 0.0
    assert any(k.startswith("eval/exact_match/") for k in evals[-1])
    assert summary.eval_after is not None and summary.tokens_per_s > 0
    assert (tmp_path / "qs" / "tokenizer.model").is_file()


@pytest.mark.slow
def test_quickstart_t5_variant_trains_and_evaluates(tmp_path, capsys):
    """configs/quickstart.py:model=t5, shortened: the encoder-decoder trains on packed seq2seq rows
    and is evaluated (held-out loss, greedy exact match through the encoder-decoder sampler)."""
    c = validation.load_config(
        "configs/quickstart.py:steps=6,model=t5",
        ["data.num_train_examples=400", "data.num_eval_examples=16", "train.log_every=3", "train.progress_bar=false",
         "mesh.data=8", "optim.warmup_steps=1"],  # full lr from step 1
    )
    summary = trainer.train(c, tmp_path / "qs")
    out = capsys.readouterr().out
    assert "model t5/tiny-v1.1" in out and "held-out exact match before training" in out
    rows = read_metrics(tmp_path / "qs")
    losses = [r["loss"] for r in rows if "loss" in r and "eval/loss" not in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    evals = [r for r in rows if "eval/exact_match" in r]
    assert [r["step"] for r in evals] == [0, 6] and all(r["eval/loss"] > 0 for r in evals)
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]  # the same held-out rows: 6 steps learned something
    assert summary.eval_after is not None
    # `jaxtune generate` / the Python API on the run: the prompt is the encoder's input, prompt + </s>
    from jaxtune import api, generate

    run = api.load(str(tmp_path / "qs"))
    prompt = "Write it in capital letters: ring"
    ids = run.tokenizer.encode(prompt) + [run.tokenizer.eos_id]
    direct = generate.generate(run.model, run.params, [ids], max_new_tokens=4, stop_tokens=(run.tokenizer.eos_id,),
                               pad_id=run.tokenizer.pad_id)
    assert run.generate(prompt, max_new_tokens=4) == [generate.decode_completion(run.tokenizer.decode, direct[0], ())]
