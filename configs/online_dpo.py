"""Online DPO on the built-in arithmetic word problems, from an SFT run: configs/grpo.py's model,
prompts and rewards, with each step's pairs sampled from the current policy and ranked.

    jaxtune train --config configs/grpo.py:stage=sft --workdir runs/grpo_sft     # the SFT start
    jaxtune train --config configs/online_dpo.py:init_from=runs/grpo_sft --workdir runs/online_dpo

Arguments (comma-separated): `init_from=WORKDIR`, `hf_dir=DIR`, `lora=RANK` (the reference is then
the base without adapters), `steps=N` as configs/grpo.py; `loss_type=sigmoid|ipo|hinge`;
`reward_model=DIR` ranks the pairs by a trained reward model (`objective.type=reward` workdir or an
exported *ForSequenceClassification directory) instead of the verifier (`worked_steps`);
`judge=module:function` ranks them by a pairwise judge (jaxtune/objectives/online_dpo.py).
"""

import importlib.util
from pathlib import Path

from jaxtune.config import parse_arg

PROMPT_KEYS = ("format", "prompt_template", "rewards", "reward_weights", "max_completion_tokens", "top_p", "top_k",
               "sample_every", "eval_samples")


def get_config(arg=None):
    args = parse_arg(arg, init_from="", hf_dir="", lora=0, steps=0, loss_type="sigmoid", reward_model="", judge="")
    grpo_args = ",".join(f"{k}={args[k]}" for k in ("init_from", "hf_dir", "lora", "steps") if args[k])
    c = _grpo_module().get_config(grpo_args or None)
    g = c.objective.grpo
    section = {k: g[k] for k in PROMPT_KEYS if k in g}
    section.update(loss_type=args["loss_type"], beta=0.1, missing_eos_penalty=1.0, judge=args["judge"])
    if args["reward_model"]:  # the learned reward ranks; the verifiers are still logged (weight 0)
        section.update(rewards=("math", "worked_steps", f"reward_model:{args['reward_model']}"),
                       reward_weights=(0.0, 0.0, 1.0))
    c.objective.type = "online_dpo"
    c.objective.online_dpo = section
    del c.objective["grpo"]
    c.data.packing = False  # padded [pairs, 2, seq_len] rows
    c.data.seq_len = 128  # prompt (<= ~70 tokens) + 48 completion tokens
    c.train.global_batch_size = 16  # pairs (prompts) per step
    c.optim.lr = 5e-5
    return c


def _grpo_module():
    """configs/grpo.py (this file's neighbour, wherever the configs are)."""
    spec = importlib.util.spec_from_file_location("jaxtune_grpo_config", Path(__file__).with_name("grpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
