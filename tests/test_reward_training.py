"""The reward-model objective through the trainer, `jaxtune eval` and the export to transformers:
a run learns the held-out preference, and the exported `*ForSequenceClassification` scores what
`jaxtune.reward_fn` scores (within 1e-4)."""

import json
import math

import numpy as np
import pytest

from jaxtune import cli, trainer, validation
from jaxtune.data.tokenizers import train_sentencepiece
from jaxtune.errors import UserError
from jaxtune.metrics import read_metrics
from jaxtune import generate
from jaxtune.api import reward_fn
from tests.helpers import WORDS, reverse_pair, write_preference_jsonl

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = {
    "data.seq_len": 24, "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2,
    "train.steps": 8, "train.global_batch_size": 8, "train.log_every": 4, "train.checkpoint_every": 100,
    "train.progress_bar": False, "optim.lr": 3e-3, "optim.warmup_steps": 0, "mesh.rules": "dp",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    pairs = write_preference_jsonl(root / "pairs.jsonl", 48)
    with pairs.open("a") as f:  # a record with a margin: the chosen completion must win by 0.5
        f.write(json.dumps({**reverse_pair(48), "margin": 0.5}) + "\n")
    held_out = write_preference_jsonl(root / "eval.jsonl", 16, start=200)
    texts = [reverse_pair(i)[k] for i in range(48) for k in ("prompt", "chosen")] + WORDS
    train_sentencepiece(texts, root / "spm", vocab_size=300)
    return {"pairs": pairs, "eval": held_out, "tokenizer": str(root / "spm.model")}


def reward_config(files, arg="", **overrides):
    values = {**TINY, "data.train_path": files["pairs"], "data.eval_path": files["eval"],
              "data.tokenizer": files["tokenizer"], **overrides}
    return validation.load_config(f"configs/reward.py:{arg}", [f"{k}={v}" for k, v in values.items()])


def _hf_scores(hf_dir, rewards, prompts, completions):
    """transformers' scores of the token ids jaxtune's reward function reads, right-padded."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    ids = [rewards.tokens(p, c) for p, c in zip(prompts, completions)]
    width = max(map(len, ids))
    pad = model.config.pad_token_id
    batch = torch.tensor([r + [pad] * (width - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    with torch.no_grad():
        return model(batch, attention_mask=mask).logits[:, 0].numpy()


def test_reward_model_trains_evaluates_and_scores_the_same_in_transformers(files, tmp_path, capsys):
    workdir = tmp_path / "rm"
    summary = trainer.train(reward_config(files, **{"objective.reward.center_rewards_coefficient": 0.01}), workdir)
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert rows[0]["loss"] > rows[-1]["loss"] and all(math.isfinite(r["margin"]) for r in rows)
    assert rows[-1]["accuracy"] == 1.0
    assert summary.eval_before["accuracy"] < 0.9 <= summary.eval_after["accuracy"]  # held-out pairs
    assert summary.eval_after["margin"] > summary.eval_before["margin"]

    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    assert "accuracy: 1.0000" in capsys.readouterr().out

    out = tmp_path / "hf"
    assert cli.main(["convert", "--workdir", str(workdir), "--hf_out", str(out)]) == 0
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    pairs = [reverse_pair(i) for i in range(200, 216)]  # the held-out pairs
    prompts = [p["prompt"] for p in pairs] * 2
    completions = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    rewards = reward_fn(str(workdir))
    ours = np.asarray(rewards(prompts, completions, answer=[None] * 32))  # other record fields are ignored
    # The Python reward function scores what the objective trained and evaluated on ...
    assert ours[:16].mean() == pytest.approx(summary.eval_after["rewards/chosen"], abs=1e-5)
    assert ours[16:].mean() == pytest.approx(summary.eval_after["rewards/rejected"], abs=1e-5)
    # ... and transformers scores the same with the exported model.
    theirs = _hf_scores(out, rewards, prompts, completions)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert (ours[:16] > ours[16:]).all()  # it prefers the reversed words
    with pytest.raises(UserError, match="2 prompts but 1 completions"):
        rewards(["a", "b"], ["c"])
    with pytest.raises(UserError, match="reward model .* cannot generate"):
        generate.generate(rewards.model, rewards.variables, [[5, 6]], max_new_tokens=2)


def _causal_lm_dir(files, out):
    """A tiny random Llama causal LM saved as an HF dir, with the test tokenizer's vocabulary."""
    import jax
    import jax.numpy as jnp

    from jaxtune import models, sharding
    from jaxtune.data.tokenizers import load_tokenizer

    vocab = load_tokenizer(files["tokenizer"]).vocab_size
    causal = models.get_config("llama", "tiny", vocab_size=vocab, hidden_size=32, intermediate_size=64)
    params = sharding.unbox(models.build(causal).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return models.save_pretrained(causal, params, out)


def test_reward_model_from_a_causal_lm_dir_restores_for_eval_convert_and_reward_fn(files, tmp_path, capsys):
    """A reward model trained from a causal-LM model.hf_dir: its config.json has no pad id, so
    restoring the run reads the tokenizer for it (this crashed every command that restores a run)."""
    workdir = tmp_path / "rm"
    trainer.train(reward_config(files, **{"train.steps": 1, "train.log_every": 1,
                                          "model.hf_dir": _causal_lm_dir(files, tmp_path / "lm")}), workdir)
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    assert "accuracy: " in capsys.readouterr().out
    rewards = reward_fn(str(workdir))
    assert rewards.model.config.pad_token_id == rewards.tokenizer.pad_id
    assert cli.main(["convert", "--workdir", str(workdir), "--hf_out", str(tmp_path / "hf")]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_config["pad_token_id"] == rewards.tokenizer.pad_id


@pytest.mark.slow
def test_lora_reward_model_from_a_causal_lm_exports_merged_and_peft(files, tmp_path):
    """LoRA on a causal-LM HF dir: the head starts new and trains in full (peft's modules_to_save);
    the merged export and the PEFT adapters on the causal LM score what reward_fn scores."""
    import peft

    lm_dir = _causal_lm_dir(files, tmp_path / "lm")
    workdir = tmp_path / "rm_lora"
    trainer.train(reward_config(files, "method=lora", **{"train.steps": 6, "data.eval_path": "",
                                                         "model.hf_dir": lm_dir}), workdir)
    merged, adapters = tmp_path / "merged", tmp_path / "peft"
    assert cli.main(["export", "--workdir", str(workdir), "--merged", str(merged), "--peft", str(adapters)]) == 0
    rewards = reward_fn(str(workdir))
    assert np.abs(np.asarray(rewards.variables["lora"]["score"]["delta"])).max() > 0  # the head trained
    prompts, completions = ["reverse: a b c ="] * 2, [" c b a", " a b c"]
    ours = rewards(prompts, completions)
    np.testing.assert_allclose(ours, _hf_scores(merged, rewards, prompts, completions), atol=1e-4, rtol=0)
    assert json.loads((adapters / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        lm_dir, num_labels=1, pad_token_id=rewards.tokenizer.pad_id)
    with_adapters = peft.PeftModel.from_pretrained(base, str(adapters)).eval()
    ids = torch.tensor([rewards.tokens(p, c) for p, c in zip(prompts, completions)])
    with torch.no_grad():
        np.testing.assert_allclose(ours, with_adapters(ids).logits[:, 0].numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_reward_model_starts_from_an_sft_run(files, tmp_path):
    """model.init_from an SFT run (a causal LM): the decoder is read, the head starts from the seed."""
    sft = reward_config(files, **{"objective.type": "sft", "data.templates": "(('{prompt}', '{chosen}'),)",
                                  "train.steps": 2, "data.eval_path": ""})
    trainer.train(sft, tmp_path / "sft")
    summary = trainer.train(reward_config(files, **{"model.init_from": tmp_path / "sft", "train.steps": 2}), tmp_path / "rm")
    assert summary.steps == 2 and math.isfinite(summary.metrics["loss"])


def test_bad_reward_settings_are_reported(files):
    with pytest.raises(UserError, match="center_rewards_coefficient' must be >= 0"):
        validation.validate(reward_config(files, **{"objective.reward.center_rewards_coefficient": -1.0}))
    with pytest.raises(UserError, match="reference-free"):
        validation.validate(reward_config(files, **{"objective.reward.reference": "copy"}))


@pytest.mark.slow
def test_packed_reward_model_trains_as_the_padded_one_step_for_step(files, tmp_path):
    """data.packing=true: the same pairs per step in fewer rows, the same losses and metrics."""
    import jax

    rows = {}
    for packing in (False, True):
        config = reward_config(files, **{"data.packing": packing, "data.seq_len": 48, "data.max_pairs_per_row": 4,
                                         "train.steps": 3, "train.log_every": 1, "mesh.data": 2})
        trainer.train(config, tmp_path / str(packing), devices=jax.devices()[:2])
        rows[packing] = {r["step"]: r for r in read_metrics(tmp_path / str(packing)) if "loss" in r}
    assert sorted(rows[True]) == sorted(rows[False]) == [1, 2, 3]
    for step, padded in rows[False].items():
        for key in ("loss", "accuracy", "margin", "rewards/chosen", "grad_norm"):
            assert rows[True][step][key] == pytest.approx(padded[key], rel=1e-4, abs=1e-5), (step, key)
