"""Tunix's GRPO learner at benchmarks/grpo_step.py's shape; runs in a virtualenv with google-tunix.

    /work/tunix-venv/bin/python benchmarks/grpo_tunix.py --model_dir DIR --prompts prompts.jsonl --mode full

Tunix lives in its own virtualenv (it pulls its own transformers, qwix, ... and must not move this
project's pins), so benchmarks/grpo_step.py runs this script as a subprocess under that
virtualenv's python; it imports nothing from jaxtune. Set up (once):

    python3 -m venv /work/tunix-venv && /work/tunix-venv/bin/pip install google-tunix "jax[cpu]"

(measured with google-tunix 0.1.7, jax 0.10.2, flax 0.12.8). The model is the same Hugging Face
safetensors directory (Tunix's Llama 3 module at the same shape, weights loaded by Tunix's own
loader), the tokenizer the same tokenizer.json (through transformers), the reward the same
(the share of even token ids), on a one-device mesh with the vanilla (KV-cache) sampler, beta 0,
one update per rollout, AdamW. Per global step (rollout + update) the wall time is taken
around the learner's own step method; prints one JSON line: the median over steps 2.. of the
step, its sampling part (the cluster's `generate`) and the rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
import optax


def even_token_reward(prompts, completions, **kwargs):
    out = []
    for text in completions:
        words = [w for w in text.split() if w.startswith("t") and w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(1, len(words)))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model_dir", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--mode", choices=("full", "lora"), default="full")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--num_prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--completion", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()

    import transformers
    from tunix.models.llama3 import model as llama3_model
    from tunix.models.llama3 import params as llama3_params
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    with open(f"{args.model_dir}/config.json") as f:
        hf = json.load(f)
    config = llama3_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf["hidden_size"] // hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000))),
        norm_eps=hf["rms_norm_eps"], weight_tying=hf.get("tie_word_embeddings", False))
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)  # Tunix shards by hints (Auto axes)
    with mesh:
        base = llama3_params.create_model_from_safe_tensors(args.model_dir, config, mesh)
    actor = base
    if args.mode == "lora":
        import qwix

        provider = qwix.LoraProvider(module_path=".*q_proj|.*k_proj|.*v_proj|.*o_proj", rank=args.rank,
                                     alpha=2.0 * args.rank)
        actor = qwix.apply_lora_to_model(base, provider, **base.get_model_input())
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(args.model_dir)

    with open(args.prompts) as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    # Arrays, not lists: the learner repeats every leaf G times along axis 0 (a list's strings would be leaves).
    batches = [{"prompts": np.array(prompts[i : i + args.num_prompts])} for i in range(0, len(prompts), args.num_prompts)]
    prompt_len = max(len(tokenizer.encode(p)) for p in prompts[: 64])
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=args.completion, max_prompt_length=prompt_len, temperature=1.0, top_p=1.0, top_k=None,
        kv_cache_size=prompt_len + args.completion + 8, eos_tokens=[tokenizer.eos_token_id])
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.adamw(args.lr), eval_every_n_steps=10**9, max_steps=args.steps,
        mini_batch_size=args.num_prompts, train_micro_batch_size=args.num_prompts,
        rollout_micro_batch_size=args.num_prompts, compute_logps_micro_batch_size=args.num_prompts,
        pbar_description=None)
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                      rl_cluster_lib.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False, training_config=training, rollout_config=rollout)
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=base, tokenizer=tokenizer, cluster_config=cluster_config)
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=[even_token_reward],
        algo_config=grpo_learner.GRPOConfig(num_generations=args.generations, num_iterations=1, beta=0.0, epsilon=0.2))

    steps, sampling = [], []
    step_method, generate = learner._run_global_step, cluster.generate

    def timed_step(*a, **k):
        t0 = time.perf_counter()
        out = step_method(*a, **k)
        jax.block_until_ready(jax.tree.leaves(nnx_state(cluster)))
        steps.append(time.perf_counter() - t0)
        return out

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        out = generate(*a, **k)
        sampling.append(time.perf_counter() - t0)
        return out

    learner._run_global_step, cluster.generate = timed_step, timed_generate
    with mesh:
        learner.train(batches)
    steps, sampling = steps[1:], sampling[1 : len(steps) + 1]
    print(json.dumps({"step_s": statistics.median(steps), "sampling_s": statistics.median(sampling),
                      "learner_s": statistics.median(s - g for s, g in zip(steps, sampling)), "steps_timed": len(steps),
                      "jax": jax.__version__}))


def nnx_state(cluster):
    from flax import nnx

    return nnx.state(cluster.actor_trainer.model)


if __name__ == "__main__":
    main()
