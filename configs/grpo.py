"""GRPO (RL with verifiable rewards) on the built-in arithmetic word problems, from an SFT run.

    jaxtune train --config configs/grpo.py:init_from=runs/grpo_sft --workdir runs/grpo

`init_from` is the workdir of an SFT run of the same model shape (its tokenizer is reused), e.g.
`configs/grpo.py:stage=sft` (the same problems' worked solutions, a few CPU minutes):

    jaxtune train --config configs/grpo.py:stage=sft --workdir runs/grpo_sft

Arguments (comma-separated): `stage=sft|grpo` (default grpo), `init_from=WORKDIR`,
`hf_dir=DIR` (start from a Hugging Face model instead; set data.tokenizer too), `lora=RANK`
(train LoRA adapters; the KL reference is then the base without adapters, no copy; LoRA starts
from `hf_dir`: export the SFT run first with `jaxtune export`, as for LoRA-DPO),
`variant=grpo|dr_grpo|dapo|gspo` (the loss family; see jaxtune/objectives/grpo.py),
`steps=N`. Before and after training 300 held-out prompts (never trained on) are answered greedily
and twice by sampling, and their mean reward / accuracy logged (`eval/greedy/accuracy`,
`eval/sampled/reward`, ...); sampled completions are written to WORKDIR/samples/ every 50 steps.
"""

import importlib.util
from pathlib import Path

from jaxtune.config import base_config, parse_arg
from jaxtune.errors import UserError

VARIANTS = {
    "grpo": {},
    "dr_grpo": {"scale_rewards": False, "aggregation": "constant"},
    "dapo": {"clip_high": 0.28, "aggregation": "token_mean", "dynamic_sampling": True, "overlong_cache": 8},
    "gspo": {"importance": "sequence", "clip_low": 3e-4, "clip_high": 4e-4},
}


def get_config(arg=None):
    args = parse_arg(arg, stage="grpo", init_from="", hf_dir="", lora=0, variant="grpo", steps=0)
    if args["stage"] not in ("sft", "grpo") or args["variant"] not in VARIANTS:
        raise UserError(f"configs/grpo.py: stage must be sft or grpo and variant one of {', '.join(VARIANTS)}; "
                        f"got stage={args['stage']!r}, variant={args['variant']!r}")
    c = base_config()
    c.model = _quickstart_config().model  # the quickstart's model shape: small and fast on a CPU
    c.mesh.rules = "dp"
    c.data.seq_len = 128
    c.data.tokenizer_vocab_size = 512
    c.objective.prompts = "verifiable"
    c.data.verifiable_families = ("arithmetic",)
    c.objective.prompt_template = "{prompt} A:"
    c.data.num_eval_examples = 300
    c.data.source = "verifiable"

    if args["stage"] == "sft":
        # Supervised warm start: worked solutions of the training problems ("3 + 4 = 7. #### 7").
        c.data.templates = (("{prompt} A:", " {solution}"),)
        c.data.num_train_examples = 100_000
        # 300 steps (~4 CPU minutes) put the model at ~45% greedy / ~35% sampled held-out accuracy:
        # inside the band where GRPO's samples sometimes succeed and there is room to gain.
        c.train.steps = 300
        c.train.global_batch_size = 16
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 50
        c.eval.max_new_tokens = 40
    else:
        c.objective.type = "grpo"
        c.objective.rewards = ("math",)
        c.objective.num_prompts = 8
        c.objective.num_generations = 8
        c.objective.max_completion_tokens = 40  # worked solutions are up to ~33 tokens
        c.objective.temperature = 1.0
        c.objective.sample_every = 50
        c.objective.eval_samples = 2
        for key, value in VARIANTS[args["variant"]].items():
            c.objective[key] = value
        c.data.num_train_examples = 100_000
        # 64 completions of up to ~115 tokens (prompt included), packed two or more per 256-token row.
        c.data.seq_len = 256
        c.train.global_batch_size = 32
        c.train.steps = 300
        c.train.eval_every = 0  # held-out reward before and after (each ~1-2 CPU minutes)
        c.train.checkpoint_every = 50
        c.train.max_seconds = 720.0  # ~10 minutes of GRPO steps after the first held-out evaluation
        c.optim.lr = 3e-4
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 0
        c.model.init_from = args["init_from"]
        c.model.hf_dir = args["hf_dir"]
    if args["lora"]:
        c.peft.method = "lora"
        c.peft.rank = args["lora"]
    if args["steps"]:
        c.train.steps = args["steps"]
    return c


def _quickstart_config():
    """configs/quickstart.py's config (this file's neighbour, wherever the configs are)."""
    spec = importlib.util.spec_from_file_location("jaxtune_quickstart_config", Path(__file__).with_name("quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
