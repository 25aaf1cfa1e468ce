"""PPO with a value model (InstructGPT-style RLHF) on the built-in arithmetic word problems, from an SFT run.

    jaxtune train --config configs/grpo.py:stage=sft --workdir runs/grpo_sft      # the SFT policy
    jaxtune train --config configs/ppo.py:init_from=runs/grpo_sft --workdir runs/ppo

Against a trained reward model instead of the verifiers, add `,reward_model=runs/rm` to the argument.

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

from jaxtune.config import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, init_from="", hf_dir="", lora=0, steps=0, reward_model="")
    passed = ",".join(f"{k}={v}" for k, v in args.items() if k != "reward_model" and v)
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
    )
    c.train.checkpoint_every = 52  # a multiple of num_ppo_epochs * num_mini_batches
    c.optim.lr = 1e-4
    return c


def _grpo_module():
    """configs/grpo.py (this file's neighbour, wherever the configs are)."""
    spec = importlib.util.spec_from_file_location("jaxtune_grpo_config", Path(__file__).with_name("grpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
