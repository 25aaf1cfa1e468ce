"""GRPO end to end on a tiny model: rollouts from the policy, metrics, sample dumps, held-out eval,
exact resume, LoRA with the adapter-free base as KL reference, and config errors."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxtune import trainer, validation
from jaxtune.errors import UserError
from jaxtune.metrics import read_metrics


def grpo_config(**overrides):
    c = validation.load_config("configs/grpo.py", ())
    c.unlock()
    small = {
        "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2, "model.num_heads": 4,
        "model.num_kv_heads": 2, "data.seq_len": 96, "data.num_train_examples": 64,
        "data.num_eval_examples": 4, "data.packing": False, "objective.grpo.num_prompts": 2,
        "objective.grpo.num_generations": 4, "objective.grpo.max_completion_tokens": 6, "objective.grpo.sample_every": 2,
        "train.global_batch_size": 8, "train.steps": 2, "train.eval_every": 0, "train.checkpoint_every": 2,
        "train.log_every": 1, "train.max_seconds": 0.0, "train.progress_bar": False, "optim.lr": 1e-2,
        "eval.show_examples": 0,
    }
    for key, value in {**small, **overrides}.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.lock()
    validation.validate(c)
    return c


@pytest.mark.slow  # ~40 s of compiles (sampler, step, eval) on 2 cores; the default run covers the parts
def test_grpo_trains_logs_metrics_and_dumps_samples(tmp_path):
    summary = trainer.train(grpo_config(), tmp_path)
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("rollout/reward", "rollout/reward/math", "rollout/accuracy", "rollout/zero_spread_groups",
                "rollout/completion_len", "rollout/truncated", "rollout/rollout_tokens_per_s",
                "rollout/sampling_fraction", "clip_low", "clip_high", "entropy", "completions"):
        assert key in rows[0], key
    assert rows[0]["completions"] == 8 and 0 <= rows[0]["rollout/accuracy"] <= 1
    assert rows[0]["rollout/completion_len_max"] <= 6
    samples = [json.loads(line) for line in (tmp_path / "samples" / "step_0.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and set(samples[0]) >= {"prompt", "completion", "reward", "rewards"}
    assert samples[0]["prompt"] == samples[3]["prompt"] != samples[4]["prompt"]  # groups of G=4
    assert set(summary.eval_after) >= {"greedy/reward", "greedy/accuracy", "sampled/reward", "sampled/accuracy"}


def _params(workdir, step):
    with ocp.CheckpointManager(workdir / "checkpoints") as m:
        return m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {},
    {"objective.grpo.num_iterations": 2, "objective.grpo.beta": 0.05, "objective.grpo.aggregation": "token_mean",
     "objective.grpo.clip_high": 0.28},
    {"peft.method": "lora", "peft.rank": 4, "objective.grpo.beta": 0.05, "objective.grpo.importance": "sequence"},
    # RLOO: the base (no adapters) is the KL reference scored at rollout time; batch-normalised, two passes
    {"peft.method": "lora", "peft.rank": 4, "objective.grpo.advantage_estimator": "rloo", "objective.grpo.beta": 0.05,
     "objective.grpo.kl_estimator": "k1", "objective.grpo.importance": "sequence_sum",
     "objective.grpo.normalize_advantages": True, "objective.grpo.num_iterations": 2},
    # REINFORCE++: a copy of the start weights is the reference, token advantages in packed rows
    {"objective.grpo.advantage_estimator": "reinforce_pp", "objective.grpo.beta": 0.05,
     "objective.grpo.kl_estimator": "k1", "data.packing": True},
])
def test_resume_mid_run_is_exact(tmp_path, overrides):
    # The first half stops by train.steps=2, so the learning rate must not depend on train.steps
    # (configs/grpo.py warms up over min(warmup_steps, steps - 1) steps): constant, no warmup.
    overrides = {"train.steps": 4, "train.checkpoint_every": 2, "data.num_eval_examples": 0,
                 "optim.warmup_steps": 0, **overrides}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    trainer.train(grpo_config(**overrides), reference)
    trainer.train(grpo_config(**{**overrides, "train.steps": 2}), resumed)  # stops at a checkpoint
    trainer.train(grpo_config(**overrides), resumed)  # the same run, resumed at step 2
    losses = {r["step"]: (r["loss"], r["rollout/reward"]) for r in read_metrics(reference) if "loss" in r}
    again = {r["step"]: (r["loss"], r["rollout/reward"]) for r in read_metrics(resumed) if "loss" in r}
    assert again == losses
    for a, b in zip(jax.tree.leaves(_params(reference, 4)), jax.tree.leaves(_params(resumed, 4))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("overrides, message", [
    ({"objective.grpo.num_generations": 1}, "objective.grpo.num_generations' must be >= 2"),
    ({"objective.grpo.aggregation": "median"}, "objective.grpo.aggregation' must be one of"),
    ({"objective.grpo.rewards": ("no_such_module_q:f",), "objective.grpo.reward_weights": ()}, "cannot import module"),
    ({"objective.grpo.rewards": ("math",)}, "1 reward functions but 2 weights"),
    ({"objective.grpo.num_iterations": 2, "train.checkpoint_every": 3}, "must be a multiple of"),
    ({"data.builtin": ""}, "config key 'data.train_path' is empty"),
    ({"data.builtin": "quickstart"}, "prompts come from data.builtin='verifiable' or data.train_path"),
    ({"data.verifiable_families": ("poetry",)}, "config key 'data.verifiable_families' must be"),
    ({"objective.grpo.advantage_estimator": "ppo"}, "advantage_estimator' must be one of grpo, rloo, reinforce_pp"),
    ({"objective.grpo.gamma": 0.0}, "objective.grpo.gamma' must be in \\(0, 1\\]"),
    ({"objective.grpo.importance": "median"}, "importance' must be one of token, sequence, sequence_sum"),
    ({"objective.grpo.negative_advantage_scale": -0.5}, "negative_advantage_scale' must be in \\[0, 1\\]"),
    ({"data.verifiable_max_steps": 0}, "1 <= min <= max <= 8"),
    ({"data.verifiable_min_steps": 4}, "1 <= min <= max <= 8, got 4 and 3"),
])
def test_config_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        grpo_config(**overrides)


def test_rollouts_that_cannot_fit_their_rows_fail_at_start():
    from types import SimpleNamespace

    from jaxtune.data.builtin import verifiable
    from jaxtune.objectives.grpo import GRPO

    objective = GRPO(grpo_config(**{"objective.grpo.num_prompts": 4, "data.packing": False}))  # 16 completions, 8 rows
    objective.tokenizer = SimpleNamespace(encode=lambda text: [5] * (len(text) // 4), bos_id=2)
    records = verifiable.generate_records(20, families=("arithmetic",))
    with pytest.raises(UserError, match=r"4 prompts x 4 completions .* need 16 rows .* \(one per row\), but a rollout has"):
        objective._check_fit(records)
    objective = GRPO(grpo_config())
    objective.tokenizer = SimpleNamespace(encode=lambda text: [5] * 200, bos_id=2)
    with pytest.raises(UserError, match="need 8 rows of data.seq_len=96"):
        objective._check_fit(records)
    objective.tokenizer = SimpleNamespace(encode=lambda text: [5] * 10, bos_id=2)
    objective._check_fit(records)  # fits: no error


def test_gsm8k_prompts_load_with_their_answers_and_templates(tmp_path):
    from jaxtune.objectives.grpo import GRPO

    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"})
                            + "\n" for i in range(40)))
    config = grpo_config(**{"data.builtin": "", "objective.grpo.format": "gsm8k", "data.train_path": str(path), "data.eval_path": str(path),
                            "objective.grpo.prompt_template": "Question: {prompt}\nAnswer:"})
    data = GRPO(config).load_data(tmp_path)
    assert len(data.train) == len(data.heldout) == 40 and data.train[3]["answer"] == "6"
    assert GRPO(config).prompt_text(data.train[3]) == "Question: What is 3 plus 3?\nAnswer:"
    assert data.tokenizer.decode(data.tokenizer.encode("What is 3")) == "What is 3"
    bad = grpo_config(**{"data.builtin": "", "objective.grpo.format": "gsm8k", "data.train_path": str(path), "objective.grpo.prompt_template": "{query}"})
    with pytest.raises(UserError, match="uses field 'query'"):
        GRPO(bad).load_data(tmp_path / "bad")


def test_prompts_use_the_hf_models_own_tokenizer(tmp_path):
    """model.hf_dir without data.tokenizer: the model's tokenizer, as SFT and DPO use it (no new
    tokenizer trained into the workdir)."""
    import jax.numpy as jnp

    from jaxtune import models, sharding
    from jaxtune.data.datasets import TOKENIZER_FILE
    from jaxtune.data.tokenizers import load_tokenizer, train_sentencepiece
    from jaxtune.objectives.grpo import GRPO

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    words = [f"What is {i} plus {j}? The answer is {i + j}." for i in range(20) for j in range(20)]
    train_sentencepiece(words, hf_dir / "tokenizer", vocab_size=400)  # the corpus caps it below 400
    vocab = load_tokenizer(hf_dir / "tokenizer.model").vocab_size
    cfg = models.get_config("llama", "tiny", vocab_size=vocab, hidden_size=32, intermediate_size=64)
    params = sharding.unbox(models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    models.save_pretrained(cfg, params, hf_dir)
    workdir = tmp_path / "run"
    data = GRPO(grpo_config(**{"model.hf_dir": str(hf_dir)})).load_data(workdir)
    assert data.tokenizer.vocab_size == vocab != grpo_config().data.tokenizer_vocab_size
    assert not (workdir / TOKENIZER_FILE).exists()


def test_chat_prompts_render_through_the_chat_template(tmp_path):
    """data.chat_template: a plain prompt becomes the user turn, a record's `messages` are used as they
    are; either way the ids end with the template's generation prompt (the assistant's header)."""
    from jaxtune.data.tokenizers import encode_with_specials, start_sequence
    from jaxtune.objectives.grpo import GRPO

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 plus 2?", "answer": "4"}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 plus 3?"}],
         "answer": "6"}) + "\n")
    config = grpo_config(**{"data.builtin": "", "data.train_path": str(path), "data.chat_template": "chatml",
                            "objective.grpo.prompt_template": "Q: {prompt}"})
    objective = GRPO(config)
    data = objective.load_data(tmp_path)
    tok = data.tokenizer
    plain, conversation = data.train
    assert objective.prompt_text(conversation) == "What is 3 plus 3?"  # what the rewards read
    want = {
        0: "<|im_start|>user\nQ: What is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n",
        1: "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 3 plus 3?<|im_end|>\n"
           "<|im_start|>assistant\n",
    }
    for i, record in enumerate((plain, conversation)):
        assert objective.prompt_ids(tok, record) == start_sequence(tok, encode_with_specials(tok, want[i]), chat=True)
    without = GRPO(grpo_config(**{"data.builtin": "", "data.train_path": str(path)}))
    assert without.prompt_ids(tok, plain) == start_sequence(tok, tok.encode("What is 2 plus 2? A:"))
    with pytest.raises(UserError, match="chat 'messages' need a chat template"):
        without.prompt_ids(tok, conversation)


def test_trl_prompt_only_records_from_a_dataset_folder(tmp_path):
    """TRL's conversational prompt-only format ({"prompt": [messages]}) read from a 🤗 dataset folder
    (data.source_kind='hf', train and eval splits): the prompt messages are the conversation."""
    import datasets

    from jaxtune.objectives.grpo import GRPO

    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} plus {i}?"}],
             "answer": str(2 * i)} for i in range(6)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "prompts"))
    config = grpo_config(**{"data.builtin": "", "data.source_kind": "hf", "data.train_path": str(tmp_path / "prompts"),
                            "data.eval_path": str(tmp_path / "prompts"), "data.chat_template": "chatml"})
    objective = GRPO(config)
    data = objective.load_data(tmp_path)
    assert len(data.train) == 4 and [r["answer"] for r in data.heldout] == ["8", "10"]
    assert objective.prompt_text(data.train[1]) == "What is 1 plus 1?"
    text = data.tokenizer.decode(objective.prompt_ids(data.tokenizer, data.train[1]))
    assert "Be brief." in text and "What is 1 plus 1?" in text


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "ends with an assistant turn"),
    ([{"role": "user"}], "must be a non-empty list"),
    ([], "must be a non-empty list"),
])
def test_bad_chat_prompts_name_the_record(tmp_path, messages, message):
    from jaxtune.objectives.grpo import GRPO

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "x", "answer": "1"}) + "\n" + json.dumps({"messages": messages, "answer": "1"}) + "\n")
    config = grpo_config(**{"data.builtin": "", "data.train_path": str(path), "data.chat_template": "chatml"})
    with pytest.raises(UserError, match=rf"prompts.jsonl:2.*{message}"):
        GRPO(config).load_data(tmp_path)


def test_learner_scores_rollouts_at_the_sampling_temperature():
    """objective.temperature is the sampler's and the learner's: the loss's log-probs (here read back
    through the entropy estimate, -mean log p of the sampled tokens) are of softmax(logits / T)."""
    import jax.numpy as jnp

    from jaxtune import trainer as trainer_lib
    from jaxtune.objectives.grpo import GRPO
    from jaxtune.logprobs import token_stats

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 6, 11)) * 3, jnp.float32)
    fns = trainer_lib.model_fns(lambda p, tokens, positions, segment_ids, frozen=None, rngs=None: logits * p)
    shapes = GRPO(grpo_config()).batch_shapes(2)
    batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
    batch.update(targets=jnp.asarray(rng.integers(0, 11, (2, 6)), jnp.int32), loss_mask=jnp.ones((2, 6), jnp.int32),
                 segment_ids=jnp.ones((2, 6), jnp.int32), advantages=jnp.ones((2, 6), jnp.float32),
                 inv_tokens=jnp.full((2,), 1 / 12, jnp.float32))
    for temperature in (0.5, 1.0):
        objective = GRPO(grpo_config(**{"objective.grpo.temperature": temperature}))
        _, metrics = objective.loss(fns, jnp.float32(1.0), batch)
        want = -token_stats(logits / temperature, batch["targets"]).logp.mean()
        assert float(metrics["entropy"]) == pytest.approx(float(want), rel=1e-5)
