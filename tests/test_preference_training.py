"""Preference objectives through the trainer: every loss runs, the step-0 identities, reference paths."""

import math

import jax
import numpy as np
import pytest

import flax.linen as nn
import jax.numpy as jnp
import optax
from jaxtune import cli, models, objectives, optim, reference, sharding, trainer, validation
from jaxtune.data import preference
from jaxtune.data.sources import JsonlSource
from jaxtune.data.tokenizers import load_tokenizer, train_sentencepiece
from jaxtune.errors import UserError
from jaxtune.objectives import preference_loss
from jaxtune.objectives.pairs import pair_scores
from jaxtune.metrics import read_metrics
from tests.helpers import WORDS, reverse_pair, write_preference_jsonl

LOSSES = ("sigmoid", "robust", "hinge", "ipo", "dpo_norm", "simpo", "orpo", "kto_pair", "kto")
TINY = {
    "data.seq_len": 24, "data.templates": "(('{prompt}', '{response}'),)", "model.hidden_size": 32,
    "model.intermediate_size": 64, "model.num_layers": 2, "train.steps": 2, "train.global_batch_size": 8,
    "train.log_every": 1, "train.checkpoint_every": 100, "train.progress_bar": False, "optim.lr": 1e-3,
    "optim.warmup_steps": 0, "mesh.rules": "dp",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    pairs = write_preference_jsonl(root / "pairs.jsonl", 48)
    unpaired = write_preference_jsonl(root / "kto.jsonl", 48, unpaired=True)
    mixed = write_preference_jsonl(root / "chat.jsonl", 48, chat=True)  # text and chat records
    texts = [reverse_pair(i)[k] for i in range(48) for k in ("prompt", "chosen")] + WORDS
    tokenizer = train_sentencepiece(texts, root / "spm", vocab_size=300)
    return {"pairs": pairs, "kto": unpaired, "chat": mixed, "tokenizer": str(root / "spm.model"), "vocab": tokenizer.vocab_size}


def dpo_config(files, loss="sigmoid", **overrides):
    data = files["kto" if loss == "kto" else "pairs"]
    values = {**TINY, "data.train_path": data, "data.tokenizer": files["tokenizer"], **overrides}
    return validation.load_config(f"configs/dpo.py:loss={loss}", [f"{k}={v}" for k, v in values.items()])


def _rows(workdir):
    return {row["step"]: row for row in read_metrics(workdir) if "loss" in row}


class Setup:
    """A tiny model, its sharded state and [8, 2, T] batches (pairs and KTO) on the 8-device mesh."""

    def __init__(self, files, seq_len=24):
        self.files = files
        self.config = dpo_config(files)
        tokenizer = load_tokenizer(files["tokenizer"])
        model_config = trainer.model_config_from(self.config, vocab_size=tokenizer.vocab_size)
        self.model = models.build(model_config)
        self.mesh = sharding.build_mesh({"data": 8, "fsdp": 1, "tensor": 1})
        self.rules = sharding.rules("dp")
        self.tx, self.lr = optim.build(self.config.optim, 10)
        self.batches = {}
        for unpaired in (False, True):
            source = JsonlSource(files["kto" if unpaired else "pairs"])
            transform = preference.PreferenceTransform(
                source, {"default": [("{prompt}", "{response}")]}, tokenizer, seq_len=seq_len,
                truncation="truncate", seed=0, unpaired=unpaired)
            self.batches[unpaired] = preference.preference_dataset(source, transform, batch_size=8, seed=0)

        self.apply_fn = trainer.make_apply_fn(self.model)

    def state(self, seed=0):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            _, shardings, init = trainer.plan_state(self.model, self.tx, self.mesh, self.rules, seq_len=8)
            return init(jax.random.key(seed))

    def step_fn(self, config):
        return trainer.make_train_step(objectives.build(config), self.apply_fn, self.tx, self.lr, accum=1)


@pytest.fixture(scope="module")
def setup(files):
    return Setup(files)


def test_every_loss_type_takes_a_step(setup):
    """The trainer's loss dispatch for every loss type, on a bigram model (cheap to compile)."""
    batches = {k: next(iter(ds)) for k, ds in setup.batches.items()}
    vocab = int(max(b["inputs"].max() for b in batches.values())) + 1

    def bigram(params, tokens, positions, segment_ids, frozen=None, rngs=None):
        return params["w"][tokens]

    params = {"w": jax.random.normal(jax.random.key(0), (vocab, vocab))}
    tx = optax.sgd(0.1)
    for loss in LOSSES:
        c = dpo_config(setup.files, loss)
        step = jax.jit(trainer.make_train_step(objectives.build(c), bigram, tx, optax.constant_schedule(0.1), accum=2))
        state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        new, metrics = step(state, batches[loss == "kto"], params)
        assert np.isfinite(float(metrics["loss"])), loss
        assert float(optax.global_norm(jax.tree.map(jnp.subtract, new.params, params))) > 0, loss
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(metrics)
        if loss in ("sigmoid", "robust", "dpo_norm"):  # policy == reference
            assert float(metrics["loss"]) == pytest.approx(math.log(2.0), abs=1e-6), loss


def test_dpo_learns_a_held_out_preference(setup, files, tmp_path):
    """DPO on 'reverse the words' (chosen) vs 'copy them' (rejected): held-out accuracy well above 0.5."""
    held_out = JsonlSource(write_preference_jsonl(tmp_path / "held_out.jsonl", 32, start=5000))
    transform = preference.PreferenceTransform(
        held_out, {"default": [("{prompt}", "{response}")]}, load_tokenizer(files["tokenizer"]), seq_len=24,
        truncation="truncate", seed=0)
    eval_batch = next(iter(preference.preference_dataset(held_out, transform, batch_size=32, seed=0, shuffle=False)))
    objective = objectives.build(dpo_config(files, **{"objective.dpo.beta": 0.5}))  # reference: a frozen copy
    state, ref = setup.state(), setup.state().params
    tx = optax.adam(3e-3)
    state = trainer.TrainState(step=state.step, params=state.params, opt_state=tx.init(state.params))
    step = jax.jit(trainer.make_train_step(objective, setup.apply_fn, tx, optax.constant_schedule(3e-3), accum=1))

    @jax.jit
    def held_out_accuracy(params):
        logps, _ = pair_scores(setup.apply_fn, params, eval_batch)
        ref_logps, _ = pair_scores(setup.apply_fn, ref, eval_batch)
        return preference_loss("sigmoid", logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1])[1]["rewards/accuracies"]

    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        it = iter(setup.batches[False])
        for _ in range(25):
            state, metrics = step(state, next(it), ref)
        accuracy = float(held_out_accuracy(state.params))
    assert float(metrics["rewards/accuracies"]) > 0.8
    assert accuracy > 0.8, accuracy


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_type_trains_from_the_cli(files, tmp_path, loss):
    data = files["kto" if loss == "kto" else "pairs"]
    values = {**TINY, "data.train_path": data, "data.tokenizer": files["tokenizer"]}
    argv = ["train", "--config", f"configs/dpo.py:loss={loss}", "--workdir", str(tmp_path / loss)]
    assert cli.main(argv + [f"--config.{k}={v}" for k, v in values.items()]) == 0
    rows = _rows(tmp_path / loss)
    assert sorted(rows) == [1, 2]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert all(math.isfinite(r[key]) for r in rows.values()), key


def test_step0_dpo_is_ln2_with_zero_rewards_for_every_reference(files, tmp_path):
    """(a) LoRA base model, (b) frozen copy, (c) precomputed: the same step-0 loss; LoRA holds no copy.

    The data mixes text pairs and chat `messages` pairs (rendered with data.chat_template)."""
    first, summaries = {}, {}
    runs = {"copy": {"objective.dpo.reference": "copy"}, "precomputed": {"objective.dpo.reference": "precomputed"},
            "lora": {"peft.method": "lora"}}
    chat = {"data.train_path": files["chat"], "data.chat_template": "plain", "train.steps": 1}
    for kind, overrides in runs.items():
        summaries[kind] = trainer.train(dpo_config(files, **overrides, **chat), tmp_path / kind)
        first[kind] = _rows(tmp_path / kind)[1]
        assert first[kind]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert first[kind][key] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "precomputed" / reference.STORE_DIR / "done.json").is_file()
    # Every record, chat or text, was tokenized and scored (a dropped pair would stay NaN).
    assert np.isfinite(np.load(tmp_path / "precomputed" / reference.STORE_DIR / "logps.npy")).all()
    assert first["copy"]["logps/chosen"] == pytest.approx(first["precomputed"]["logps/chosen"], rel=1e-6)
    # LoRA's base is the same seeded init and its adapters start as a no-op: the same policy.
    assert first["lora"]["logps/chosen"] == pytest.approx(first["copy"]["logps/chosen"], rel=1e-5)
    # Weights on the devices: a full copy doubles them; LoRA adds only the adapters to the base.
    assert summaries["precomputed"].param_bytes * 2 == summaries["copy"].param_bytes
    assert summaries["precomputed"].param_bytes < summaries["lora"].param_bytes < 1.3 * summaries["precomputed"].param_bytes


def test_precomputed_pass_resumes_from_stored_chunks(tmp_path):
    """A pass killed after its first chunk reuses that chunk and computes only the rest."""
    from tests.data.test_pipeline import CharTokenizer
    from jaxtune.data import preference

    source = [{"prompt": f"q{i}", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(10)]
    transform = preference.PreferenceTransform(source, {"default": [("{prompt}", "{response}")]}, CharTokenizer(),
                                               seq_len=16, truncation="truncate", seed=0)
    calls = []

    def score(params, batch):  # stands in for the model: summed token ids of each row's trained targets
        calls.append(len(batch["inputs"]))
        return (batch["targets"] * batch["loss_mask"]).sum(-1).astype(np.float32) * params

    kwargs = dict(batch_size=4, put=lambda b: b, fingerprint={"n": 10}, chunk_records=4)
    full = reference.precompute(score, lambda: 1.0, source, transform, tmp_path / "a", **kwargs)
    assert full.shape == (10, 2) and not np.isnan(full).any()
    store = tmp_path / "b" / reference.STORE_DIR
    store.mkdir(parents=True)
    np.save(store / "chunk_00000.npy", np.full((4, 2), 7.0, np.float32))  # the interrupted run's first chunk
    calls.clear()
    resumed = reference.precompute(score, lambda: 1.0, source, transform, tmp_path / "b", **kwargs)
    np.testing.assert_array_equal(resumed[:4], 7.0)
    np.testing.assert_array_equal(resumed[4:], full[4:])
    assert calls == [4, 4]  # records 4..9 only: two batches
    assert not list(store.glob("chunk_*"))
    np.testing.assert_array_equal(  # complete: read back, nothing computed
        reference.precompute(score, lambda: 1 / 0, source, transform, tmp_path / "b", **kwargs), resumed)
    with pytest.raises(UserError, match="different settings \\(n\\)"):
        reference.precompute(score, lambda: 1.0, source, transform, tmp_path / "b", **{**kwargs, "fingerprint": {"n": 9}})


@pytest.mark.slow  # three tiny runs
def test_init_from_an_sft_run(files, tmp_path):
    sft = dpo_config(files, **{"objective.type": "sft", "data.train_path": files["pairs"],
                               "data.templates": "(('{prompt}', '{chosen}'),)", "train.steps": 3})
    trainer.train(sft, tmp_path / "sft")
    trainer.train(dpo_config(files, **{"model.init_from": tmp_path / "sft", "train.steps": 1}), tmp_path / "dpo")
    scratch = trainer.train(dpo_config(files, **{"train.steps": 1}), tmp_path / "scratch")
    row = _rows(tmp_path / "dpo")[1]
    assert row["loss"] == pytest.approx(math.log(2.0), abs=1e-6)  # the reference copy starts from the SFT params too
    assert row["logps/chosen"] > scratch.metrics["logps/chosen"] + 1.0  # SFT on the chosen answers raised them
    with pytest.raises(UserError, match="model.init_from': no checkpoint"):
        trainer.train(dpo_config(files, **{"model.init_from": tmp_path / "nowhere"}), tmp_path / "bad")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"objective.dpo.reference": "none"}, "needs a reference model"),
        ({"objective.dpo.reference": "copy", "objective.dpo.loss_type": "simpo"}, "reference-free"),
        ({"objective.dpo.label_smoothing": 0.5}, "label_smoothing' must be in \\[0, 0.5\\)"),
        ({"objective.dpo.beta": 0.0}, "objective.dpo.beta' must be > 0"),
        ({"data.chat_template": "nope"}, "config key 'data.chat_template': chat template 'nope': not a built-in name"),
    ],
)
def test_bad_objective_settings_are_reported(files, overrides, message):
    with pytest.raises(UserError, match=message):
        dpo_config(files, **overrides)
