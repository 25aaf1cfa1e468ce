"""PPO with a value model (InstructGPT-style RLHF) on the built-in arithmetic word problems, from an SFT run.

    jaxtune train --config configs/grpo.py:stage=sft --workdir runs/grpo_sft      # the SFT policy
    jaxtune train --config configs/ppo.py:init_from=runs/grpo_sft --workdir runs/ppo

Against a trained reward model instead of the verifiers, add `,reward_model=runs/rm` to the argument;
`value_model=separate` puts the value model on its own backbone (InstructGPT's), started from the
policy (`value_init=policy`, the default) or from a reward model (`value_init=runs/rm`).

A real-size policy for `jaxtune plan` (bf16, full remat, seq 1024, 64 completions per rollout):

    jaxtune plan --config configs/ppo.py:variant=llama3.1-8b,lora=16,value_model=separate --topology v5p-8   # 16.22 of 95.74 GiB

The prompts, model shape, held-out evaluation and arguments are configs/grpo.py's (`init_from`,
`hf_dir`, `lora=RANK`, `steps=N`); `reward_model=DIR` scores completions with that reward model
(`reward_model:DIR`, a `jaxtune train` reward run or an exported `*ForSequenceClassification`)
instead of the `worked_steps` verifier (whose `math` accuracy is still logged, with weight 0).
PPO settings are TRL's defaults (jaxtune/objectives/ppo.py): KL 0.05 (k1) to the start policy
folded into the reward, GAE(1, 0.95), clip 0.2 / value clip 0.2, vf_coef 0.1, 4 epochs per rollout,
and a value head on the policy's backbone.
"""

import importlib.util
from pathlib import Path

from jaxtune.config import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, init_from="", hf_dir="", lora=0, steps=0, reward_model="", value_model="shared",
                     value_init="policy", variant="")
    own = ("reward_model", "value_model", "value_init", "variant")
    passed = ",".join(f"{k}={v}" for k, v in args.items() if k not in own and v)
    c = _grpo_module().get_config(passed or None)
    prompts = c.objective.grpo
    del c.objective["grpo"]
    c.objective.type = "ppo"
    c.objective.ppo = dict(
        prompt_template=prompts.prompt_template,
        rewards=(("math", f"reward_model:{args['reward_model']}") if args["reward_model"] else tuple(prompts.rewards)),
        reward_weights=tuple(prompts.reward_weights),
        num_prompts=32,  # one completion per prompt
        max_completion_tokens=prompts.max_completion_tokens,
        num_ppo_epochs=4,
        num_mini_batches=1,
        missing_eos_penalty=1.0,
        sample_every=prompts.sample_every,
        eval_samples=prompts.eval_samples,
        value_model=args["value_model"],
        value_init=args["value_init"],
    )
    c.train.checkpoint_every = 52  # a multiple of num_ppo_epochs * num_mini_batches
    c.optim.lr = 1e-4
    if args["variant"]:
        _real_size(c, args["variant"], lora=args["lora"])
    return c


def _real_size(c, variant: str, *, lora: int) -> None:
    """A named Llama variant at real size (what `jaxtune plan` sizes; train it from its weights with
    hf_dir): bf16 compute, full remat, a bf16 frozen base under LoRA, prompts + completions of up
    to 1024 tokens, 64 completions per rollout in 2 mini-batches of 32, weights over every device."""
    start = {k: c.model[k] for k in ("init_from", "hf_dir")}
    c.model = base_config().model  # the variant's shape (not configs/grpo.py's small one)
    c.model.update(start)
    c.model.family, c.model.variant = "llama", variant
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    if lora:
        c.peft.base_dtype = "bfloat16"
        c.peft.alpha = 2.0 * lora
    c.data.seq_len = 1024
    c.objective.ppo.max_completion_tokens = 512
    c.objective.ppo.num_prompts = 64
    c.objective.ppo.num_mini_batches = 2
    c.train.global_batch_size = 32
    c.train.checkpoint_every = 48  # a multiple of num_ppo_epochs * num_mini_batches
    c.mesh.rules, c.mesh.fsdp, c.mesh.data = "fsdp", -1, 1


def _grpo_module():
    """configs/grpo.py (this file's neighbour, wherever the configs are)."""
    spec = importlib.util.spec_from_file_location("jaxtune_grpo_config", Path(__file__).with_name("grpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
