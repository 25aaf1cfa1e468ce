"""GRPO (RL with verifiable rewards) on the built-in arithmetic word problems, from an SFT run.

    jaxtune train --config configs/grpo.py:init_from=runs/grpo_sft --workdir runs/grpo

`init_from` is the workdir of an SFT run of the same model shape (its tokenizer is reused), e.g.
`configs/grpo.py:stage=sft` (the same problems' worked solutions, a few CPU minutes):

    jaxtune train --config configs/grpo.py:stage=sft --workdir runs/grpo_sft

Arguments (comma-separated): `stage=sft|grpo` (default grpo), `init_from=WORKDIR`,
`hf_dir=DIR` (start from a Hugging Face model instead; set data.tokenizer too), `lora=RANK`
(train LoRA adapters; the KL reference is then the base without adapters, no copy; LoRA starts
from `hf_dir`: export the SFT run first with `jaxtune export`, as for LoRA-DPO),
`variant=positive|grpo|dr_grpo|dapo|gspo|rloo|reinforce_pp` (the loss family, see
jaxtune/objectives/grpo.py; RLOO and REINFORCE++ share the rollouts and rewards; the
default `positive` is GRPO trained on each group's better-than-average completions only: pushing
away from the worse ones raised this small policy's entropy and lost held-out accuracy),
`steps=N`. Before and after training 300 held-out prompts (never trained on) are answered greedily
and twice by sampling, and their mean reward / accuracy logged (`eval/greedy/accuracy`,
`eval/sampled/reward`, ...); sampled completions are written to WORKDIR/samples/ every 50 steps.
"""

import importlib.util
from pathlib import Path

from jaxtune.config import base_config, parse_arg
from jaxtune.errors import UserError

VARIANTS = {
    # GRPO with the negative advantages dropped and centred advantages: trains on each group's
    # better-than-average completions (RAFT-style). The default: the best of the family on this task.
    "positive": {"negative_advantage_scale": 0.0, "scale_rewards": False},
    "grpo": {},
    "dr_grpo": {"scale_rewards": False, "aggregation": "constant"},
    "dapo": {"clip_high": 0.28, "aggregation": "token_mean", "dynamic_sampling": True, "overlong_cache": 8},
    "gspo": {"importance": "sequence", "clip_low": 3e-4, "clip_high": 4e-4},
    # RLOO as TRL's RLOOTrainer: leave-one-out baseline, k1 KL summed into the sequence reward, one
    # sequence-level ratio per completion (log-ratios summed), mean over completions.
    "rloo": {"advantage_estimator": "rloo", "importance": "sequence_sum", "beta": 0.05, "kl_estimator": "k1"},
    # REINFORCE++: k1 KL per token in the reward, token returns whitened over the whole rollout batch.
    "reinforce_pp": {"advantage_estimator": "reinforce_pp", "beta": 0.01, "kl_estimator": "k1",
                     "aggregation": "token_mean"},
}


def get_config(arg=None):
    args = parse_arg(arg, stage="grpo", init_from="", hf_dir="", lora=0, variant="positive", steps=0)
    if args["stage"] not in ("sft", "grpo") or args["variant"] not in VARIANTS:
        raise UserError(f"configs/grpo.py: stage must be sft or grpo and variant one of {', '.join(VARIANTS)}; "
                        f"got stage={args['stage']!r}, variant={args['variant']!r}")
    c = base_config()
    c.model = _quickstart_config().model  # the quickstart's model shape: small and fast on a CPU
    c.mesh.rules = "dp"
    c.data.seq_len = 128
    c.data.tokenizer_vocab_size = 512
    c.data.builtin = "verifiable"  # the built-in problems: SFT's worked solutions, GRPO's prompts
    c.data.verifiable_families = ("arithmetic",)
    c.data.verifiable_max_steps = 3
    c.data.num_eval_examples = 300

    if args["stage"] == "sft":
        # Supervised warm start: worked solutions of the training problems ("3 + 4 = 7. #### 7").
        c.data.templates = (("{prompt} A:", " {solution}"),)
        c.data.num_train_examples = 100_000
        # Problems of 1-3 operations. 300 steps (~2-4 CPU minutes) put the model at ~40% greedy / ~30%
        # sampled held-out accuracy overall and ~28% / ~20% on 3-operation problems (GRPO's): inside
        # the band where GRPO's samples sometimes succeed and there is room to gain.
        c.train.steps = 300
        c.train.global_batch_size = 16
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 50
        c.eval.max_new_tokens = 48
    else:
        c.objective.type = "grpo"
        c.objective.grpo = dict(prompt_template="{prompt} A:")
        # 3-operation problems only: ~50k distinct ones, so a rollout's prompts are new and a gain must
        # come from better arithmetic, not from memorising problems (with 1-2 operations the ~2k
        # problems repeat, and GRPO's training reward rose while held-out accuracy fell).
        c.data.verifiable_min_steps = 3
        # Reward the working, not only the answer: `math` alone pays right answers reached by wrong
        # steps (a quarter of the SFT model's rewarded samples) and GRPO then reinforces those steps.
        # `math` (answer accuracy) is still computed and logged, with weight 0.
        g = c.objective.grpo
        g.rewards = ("math", "worked_steps")
        g.reward_weights = (0.0, 1.0)
        g.num_prompts = 16
        g.num_generations = 4
        g.max_completion_tokens = 48  # worked solutions are up to ~45 tokens
        g.temperature = 1.0
        g.sample_every = 50
        g.eval_samples = 2
        g.update(VARIANTS[args["variant"]])
        c.data.num_train_examples = 100_000
        # 64 completions of up to ~120 tokens (prompt included), packed two or more per 256-token row.
        c.data.seq_len = 256
        c.train.global_batch_size = 32
        c.train.steps = 300
        c.train.eval_every = 0  # held-out reward before and after (each ~1-2 CPU minutes)
        c.train.checkpoint_every = 50
        c.train.max_seconds = 720.0  # ~10 minutes of GRPO steps after the first held-out evaluation
        c.optim.lr = 2e-4
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 10
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
