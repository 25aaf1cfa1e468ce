"""Rollouts: G completions per prompt from the current (LoRA) policy, and their training rows."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import generate as generate_lib
from jaxtune import models
from jaxtune.models.llama import LlamaConfig
from jaxtune.objectives.grpo_loss import policy_loss
from jaxtune.logprobs import token_stats
from jaxtune.peft import base as peft_base
from jaxtune.peft import wrapper
from jaxtune.rollouts import (Rollout, build_rows, completion_positions, rollout_example, rows_needed, sample_groups,
                              sampling_policy)

VOCAB, STOP = 37, 2


def tiny(peft=None):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=64)
    model = wrapper.wrap(models.build(config), peft)
    variables = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    return model, dict(variables)


def test_groups_are_prompt_major_seeded_and_keep_the_stop_token(monkeypatch):
    spec = peft_base.Spec("lora", rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    model, variables = tiny(spec)
    assert "lora" in variables  # the sampler runs base + adapters exactly as training holds them
    seen = []
    original = generate_lib._sample_loop
    monkeypatch.setattr(generate_lib, "_sample_loop", lambda m, v, *a, **k: seen.append(v) or original(m, v, *a, **k))
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10]]
    kw = dict(decode=lambda ids: " ".join(map(str, ids)), group_size=4, max_new_tokens=6, temperature=1.0,
              stop_tokens=(STOP,))
    rollouts = sample_groups(model, variables, prompts, seed=3, **kw)
    assert [r.prompt_index for r in rollouts] == [0] * 4 + [1] * 4
    assert [r.prompt_ids for r in rollouts] == [prompts[0]] * 4 + [prompts[1]] * 4
    assert len({tuple(r.completion_ids) for r in rollouts}) > 2  # sampled, not one greedy answer
    # No copy: the sampler was handed the very arrays the caller (the train state) holds.
    assert all(x is y for x, y in zip(jax.tree.leaves(seen[0]), jax.tree.leaves(variables)))
    again = sample_groups(model, variables, prompts, seed=3, **kw)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in rollouts]
    for r in rollouts:
        stopped = STOP in r.completion_ids
        assert not stopped or r.completion_ids.index(STOP) == len(r.completion_ids) - 1  # kept, last
        assert r.truncated == (not stopped and len(r.completion_ids) == 6)
        assert r.text == " ".join(map(str, r.completion_ids[:-1] if stopped else r.completion_ids))


def _examples():
    rollouts = [Rollout(0, [1, 4, 5], [6, 7, STOP], "", False), Rollout(0, [1, 4, 5], [8], "", True),
                Rollout(1, [1, 9], [10, 11, 12, 13], "", True)]
    return [rollout_example(r, a, seq_len=16) for r, a in zip(rollouts, [0.5, -0.5, 1.0])]


def test_rows_mask_the_prompt_and_carry_advantages():
    examples = _examples()
    first = examples[0]
    np.testing.assert_array_equal(first["inputs"], [1, 4, 5, 6, 7])
    np.testing.assert_array_equal(first["targets"], [4, 5, 6, 7, STOP])
    np.testing.assert_array_equal(first["loss_mask"], [0, 0, 1, 1, 1])
    np.testing.assert_allclose(first["advantages"], [0, 0, 0.5, 0.5, 0.5])
    padded = build_rows(examples, rows=4, seq_len=8, packing=False)
    packed = build_rows(examples, rows=rows_needed(3, example_len=5, seq_len=16, packing=True), seq_len=16, packing=True)
    assert padded["inputs"].shape == (4, 8) and packed["inputs"].shape == (1, 16)
    np.testing.assert_array_equal(packed["segment_ids"][0], [1] * 5 + [2] * 3 + [3] * 5 + [0] * 3)
    np.testing.assert_array_equal(packed["positions"][0, :8], [0, 1, 2, 3, 4, 0, 1, 2])
    assert padded["segment_ids"][3].sum() == 0  # a spare row is all padding
    with pytest.raises(ValueError, match="do not fit"):
        build_rows(examples, rows=2, seq_len=8, packing=False)


@pytest.mark.parametrize("packing, rows", [(False, 4), (True, 2)])
def test_completion_positions_find_each_completions_tokens_in_the_rows(packing, rows):
    """RLOO/REINFORCE++ read per-token log-probs and write token advantages through these positions."""
    examples = _examples()
    built = build_rows(examples, rows=rows, seq_len=8 if not packing else 10, packing=packing)
    where = completion_positions(examples, rows=rows, seq_len=8 if not packing else 10, packing=packing)
    for example, (row, positions) in zip(examples, where):
        np.testing.assert_array_equal(built["targets"][row, positions], example["targets"][example["loss_mask"] == 1])
        assert built["loss_mask"][row, positions].all()
    assert sum(len(p) for _, p in where) == built["loss_mask"].sum() == 3 + 1 + 4
    assert len({row for row, _ in where}) == (2 if packing else 3)  # packed: 5 + 3 tokens share the first row


@pytest.mark.slow  # the pure-function version is in tests/objectives/test_grpo_loss.py
def test_packed_rollouts_give_the_padded_loss_through_the_model():
    model, variables = tiny()

    @jax.jit
    def loss(rows):
        logits = model.apply(variables, rows["inputs"], positions=rows["positions"], segment_ids=rows["segment_ids"])
        lp = token_stats(logits, rows["targets"]).logp
        return policy_loss(lp, rows["advantages"], rows["loss_mask"], rows["segment_ids"])[:2]

    examples = _examples()
    packed = loss(build_rows(examples, rows=1, seq_len=16, packing=True))
    padded = loss(build_rows(examples, rows=3, seq_len=8, packing=False))
    np.testing.assert_allclose(packed, padded, rtol=1e-5)


def test_lora_rollouts_sample_the_merged_policy_and_other_runs_sample_as_held():
    spec = peft_base.Spec("lora", rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    model, variables = tiny(spec)
    variables = nn.meta.unbox(variables)  # as a train state holds them
    leaves, treedef = jax.tree.flatten(variables["lora"])  # trained-looking adapters (B is zero at init)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    variables["lora"] = jax.tree.unflatten(treedef, [0.5 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    sampler, merged = sampling_policy(model, variables, spec)
    assert sampler is wrapper.unwrap(model) and set(merged) == {"params"}
    tokens = jnp.array([[1, 5, 6, 7, 8, 9]])
    np.testing.assert_allclose(sampler.apply(merged, tokens), model.apply(variables, tokens), atol=1e-5)
    assert not np.allclose(sampler.apply(merged, tokens), sampler.apply({"params": variables["params"]}, tokens), atol=1e-3)
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10]]
    assert (generate_lib.generate(sampler, merged, prompts, max_new_tokens=6)
            == generate_lib.generate(model, variables, prompts, max_new_tokens=6))
    full_model, full = tiny()
    full = nn.meta.unbox(full)
    assert sampling_policy(full_model, full, None) == (full_model, full)
    quantised = dataclasses.replace(spec, quantize="nf4")  # merging would dequantise the base: sampled as held
    assert sampling_policy(model, variables, quantised) == (model, variables)
