"""GRPO step time side by side: jaxtune vs TRL's GRPOTrainer vs Tunix's GRPOLearner, plus decode tokens/s.

    nice -n -10 python benchmarks/grpo_step.py                     # 8 prompts x 8 completions x 32 tokens
    python benchmarks/grpo_step.py --frameworks jaxtune --modes full --repeats 1   # jaxtune only
    python benchmarks/grpo_step.py --tunix_python /work/tunix-venv/bin/python   # Tunix in its own venv

Every framework trains the same tiny random-weight Hugging Face Llama (the quickstart shape:
d128 x 4 layers, vocab 512, tied head; saved once as safetensors and loaded by each) on the same
prompts (16 words "t<id>" of a word-level tokenizer.json that all three read), with the same
reward (the share of even token ids in the completion: it varies inside a group, so advantages
are not all zero), `--prompts` prompts x `--generations` completions of up to `--completion`
tokens per step, beta 0 (no reference model), one optimizer update per rollout (num_iterations 1),
AdamW. What is timed does not depend on what the model knows: random weights rarely sample EOS.

- jaxtune: `jaxtune train` (api.train) with the GRPO objective; seconds per step from its own
  rollout metrics (sampling time / sampling fraction), median over steps 2...
- TRL: GRPOTrainer with its default transformers generation (no vLLM), on CPU; seconds per
  optimizer step from a Trainer callback, median over steps 2...
- Tunix: tunix.rl.grpo GRPOLearner with its vanilla sampler on a one-device mesh, run by
  benchmarks/grpo_tunix.py under `--tunix_python` (Tunix needs its own jax/flax versions, so it
  lives in a separate virtualenv); the script reports per-step seconds the same way.
- decode: jaxtune's sampler (`generate.generate`, the one rollouts use) vs `transformers.generate`
  at the rollout batch (prompts x generations rows, temperature 1), decode tokens/s as in
  benchmarks/generate.py.

The frameworks alternate within each of `--repeats` rounds (one process; Tunix a subprocess per
round) and the medians over rounds are reported with the load average next to them; run it under
`nice -n -10` on a machine as idle as you can get. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dpo_side_by_side
import train_step

HERE = Path(__file__).resolve().parent
SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2)
PROMPT_WORDS = 16
LR = 1e-5
LORA_RANK = 16


def even_token_reward(prompts, completions, **fields):
    """The share of even token ids among a completion's words: the reward every framework uses."""
    out = []
    for text in completions:
        words = [w for w in text.split() if w.startswith("t") and w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(1, len(words)))
    return out


def load_average() -> str:
    return os.popen("uptime").read().strip().split("load average:")[-1].strip()


def write_assets(work: Path, count: int = 2000) -> dict:
    """The shared model (HF safetensors), tokenizer and prompts (JSONL with a `prompt` field)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["hidden_size"], intermediate_size=SHAPE["intermediate_size"],
        num_hidden_layers=SHAPE["num_layers"], num_attention_heads=SHAPE["num_heads"],
        num_key_value_heads=SHAPE["num_kv_heads"], tie_word_embeddings=True, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model_dir = work / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer = dpo_side_by_side.write_tokenizer(model_dir, SHAPE["vocab_size"])
    rng = np.random.default_rng(0)
    prompts = work / "prompts.jsonl"
    with prompts.open("w") as f:
        for _ in range(count):
            f.write(json.dumps({"prompt": " ".join(f"t{i}" for i in rng.integers(3, SHAPE["vocab_size"], PROMPT_WORDS))})
                    + "\n")
    return {"model_dir": str(model_dir), "tokenizer": tokenizer, "prompts": str(prompts), "work": str(work)}


# ---- jaxtune ---------------------------------------------------------------------------------


def jaxtune_config(mode: str, args, assets: dict):
    from jaxtune import api

    overrides = {
        "objective.type": "grpo", "model.hf_dir": assets["model_dir"], "data.tokenizer": str(Path(assets["model_dir"]) / "tokenizer.json"),
        "data.train_path": assets["prompts"], "data.seq_len": PROMPT_WORDS + args.completion, "data.packing": False,
        "objective.grpo.rewards": "('grpo_step:even_token_reward',)", "objective.grpo.num_prompts": args.prompts,
        "objective.grpo.num_generations": args.generations, "objective.grpo.max_completion_tokens": args.completion,
        "objective.grpo.temperature": 1.0, "train.global_batch_size": args.prompts * args.generations,
        "train.steps": args.steps, "train.log_every": 1, "train.eval_every": 0, "train.progress_bar": False,
        "train.checkpoint_every": 100_000, "optim.lr": LR, "optim.schedule": "constant", "optim.warmup_steps": 0,
        "mesh.rules": "dp", "seed": 0,
    }
    if mode == "lora":
        overrides.update({"peft.method": "lora", "peft.rank": LORA_RANK, "peft.alpha": 2.0 * LORA_RANK,
                          "peft.targets": "q,k,v,o"})
    overrides.update({"data.builtin": "", "objective.grpo.reward_weights": "()", "objective.grpo.prompt_template": "{prompt}",
                      "objective.grpo.sample_every": 0, "data.num_eval_examples": 0, "train.max_seconds": 0.0})
    return api.load_config(str(HERE.parent / "configs" / "grpo.py") + f":hf_dir={assets['model_dir']}", overrides)


def run_jaxtune(mode: str, args, assets: dict) -> dict:
    from jaxtune import api
    from jaxtune.metrics import read_metrics

    config = jaxtune_config(mode, args, assets)
    arrivals: list[float] = []  # when each step's metrics row reached the host (one row per step)
    on_metrics = lambda row: arrivals.append(time.perf_counter()) if "loss" in row else None
    with tempfile.TemporaryDirectory() as workdir:
        api.train(config, workdir, on_metrics=on_metrics)
        rows = [r for r in read_metrics(workdir) if "rollout/sampling_time_s" in r][1:]
    steps = np.diff(arrivals)[1:]  # wall time between consecutive steps, from step 2 on
    sampling = [r["rollout/sampling_time_s"] for r in rows]
    return {"step_s": float(np.median(steps)), "sampling_s": statistics.median(sampling),
            "learner_s": float(np.median(steps)) - statistics.median(sampling)}


# ---- TRL -------------------------------------------------------------------------------------


def trl_runner(mode: str, args, assets: dict):
    """run() -> {"step_s": median seconds per optimizer step over steps 2..} of TRL's GRPOTrainer."""
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(args.torch_threads or os.cpu_count())
    model = transformers.LlamaForCausalLM.from_pretrained(assets["model_dir"])
    lora = None
    if mode == "lora":
        import peft

        lora = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    completions = args.prompts * args.generations
    config = trl.GRPOConfig(
        output_dir=os.path.join(assets["work"], "trl"), max_steps=args.steps, per_device_train_batch_size=completions,
        num_generations=args.generations, max_completion_length=args.completion, temperature=1.0, beta=0.0,
        num_iterations=1, learning_rate=LR, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    data = datasets.load_dataset("json", data_files=assets["prompts"], split="train")
    times: list[float] = []
    trainer = trl.GRPOTrainer(model=model, reward_funcs=even_token_reward, args=config, train_dataset=data,
                              processing_class=assets["tokenizer"], peft_config=lora,
                              callbacks=[train_step.step_timer(times, cuda=False)])

    def run() -> dict:
        times.clear()
        trainer.train()
        return {"step_s": statistics.median(times[1:] or times)}

    return run


# ---- Tunix -----------------------------------------------------------------------------------


def run_tunix(mode: str, args, assets: dict) -> dict:
    """Tunix's GRPOLearner in its own virtualenv (benchmarks/grpo_tunix.py prints one JSON line)."""
    command = [args.tunix_python, str(HERE / "grpo_tunix.py"), "--model_dir", assets["model_dir"], "--prompts",
               assets["prompts"], "--mode", mode, "--steps", str(args.steps), "--num_prompts", str(args.prompts),
               "--generations", str(args.generations), "--completion", str(args.completion), "--lr", str(LR),
               "--rank", str(LORA_RANK)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "XLA_FLAGS")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.tunix_timeout)
    if done.returncode:
        raise RuntimeError(f"grpo_tunix.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- decode ----------------------------------------------------------------------------------


def decode_runners(args, assets: dict):
    """(jaxtune, transformers) callables: sample `--completion` tokens for the rollout batch."""
    import torch
    import transformers

    from jaxtune.generate import generate
    from jaxtune.models import hf

    rng = np.random.default_rng(1)
    rows = args.prompts * args.generations
    prompts = [list(rng.integers(3, SHAPE["vocab_size"], PROMPT_WORDS)) for _ in range(args.prompts) for _ in range(args.generations)]
    model, params = hf.from_pretrained(assets["model_dir"], rules="dp")
    torch.set_num_threads(args.torch_threads or os.cpu_count())
    hf_model = transformers.LlamaForCausalLM.from_pretrained(assets["model_dir"]).eval()
    tokens = torch.tensor(prompts)

    def jax_run(n: int) -> None:
        generate(model, params, prompts, max_new_tokens=n, temperature=1.0, seed=0, batch_size=rows)

    def torch_run(n: int) -> None:
        with torch.no_grad():
            hf_model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=True, temperature=1.0, top_k=0,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    return jax_run, torch_run


def decode_rates(run, rows: int, new_tokens: int) -> float:
    """decode tokens/s = rows * (new_tokens - 1) / (time(new_tokens) - time(1))."""
    def timed(n):
        t0 = time.perf_counter()
        run(n)
        return time.perf_counter() - t0

    return rows * (new_tokens - 1) / max(timed(new_tokens) - timed(1), 1e-9)


# ---- main ------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frameworks", default="jaxtune,trl,tunix,decode")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every framework once")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--completion", type=int, default=32)
    p.add_argument("--torch_threads", type=int, default=0,
                   help="torch intra-op threads (0: one per core); on a loaded machine 1 avoids OpenMP barrier stalls")
    p.add_argument("--tunix_python", default="/work/tunix-venv/bin/python")
    p.add_argument("--tunix_timeout", type=int, default=1200)
    p.add_argument("--workdir", default="")
    args = p.parse_args()
    frameworks = args.frameworks.split(",")
    if "trl" in frameworks and not train_step.has_module("trl"):
        sys.exit("grpo_step.py: trl is not installed (pip install -e '.[bench]'); drop it with --frameworks")
    if "tunix" in frameworks and not Path(args.tunix_python).exists():
        sys.exit(f"grpo_step.py: --tunix_python {args.tunix_python} does not exist (a virtualenv with google-tunix); "
                 "drop tunix with --frameworks")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="grpo_step_"))
    work.mkdir(parents=True, exist_ok=True)
    assets = write_assets(work)
    out: dict = {"cpu": _cpu_model(), "shape": SHAPE, "prompts": args.prompts, "generations": args.generations,
                 "completion_tokens": args.completion, "steps_per_run": args.steps, "repeats": args.repeats,
                 "load_start": load_average(),
                 "torch_threads": args.torch_threads or os.cpu_count()}
    for mode in args.modes.split(","):
        trl_run = trl_runner(mode, args, assets) if "trl" in frameworks else None
        samples: dict[str, list[dict]] = {f: [] for f in frameworks if f != "decode"}
        loads = []
        for _ in range(args.repeats):
            loads.append(load_average())
            if "jaxtune" in frameworks:
                samples["jaxtune"].append(run_jaxtune(mode, args, assets))
            if trl_run is not None:
                samples["trl"].append(trl_run())
            if "tunix" in frameworks:
                samples["tunix"].append(run_tunix(mode, args, assets))
            print(json.dumps({"mode": mode, "round": len(loads), **{f: s[-1] for f, s in samples.items()}}),
                  file=sys.stderr, flush=True)
        row = {f: {k: round(statistics.median(r[k] for r in s), 4) for k, v in s[0].items() if isinstance(v, float)}
               for f, s in samples.items()}
        row["load"] = loads
        for other in ("trl", "tunix"):
            if "jaxtune" in row and other in row:
                row[f"jaxtune_speedup_over_{other}"] = round(row[other]["step_s"] / row["jaxtune"]["step_s"], 3)
        out[mode] = row
    if "decode" in frameworks:
        jax_run, torch_run = decode_runners(args, assets)
        jax_run(args.completion), jax_run(1), torch_run(2)  # compile / warm up
        rates: dict[str, list[float]] = {"jaxtune": [], "transformers": []}
        for _ in range(args.repeats):
            rates["jaxtune"].append(decode_rates(jax_run, args.prompts * args.generations, args.completion))
            rates["transformers"].append(decode_rates(torch_run, args.prompts * args.generations, args.completion))
        decode = {f"{k}_decode_tokens_per_s": round(statistics.median(v), 1) for k, v in rates.items()}
        decode["ratio"] = round(decode["jaxtune_decode_tokens_per_s"] / decode["transformers_decode_tokens_per_s"], 3)
        decode["load"] = load_average()
        out["decode"] = decode
    out["load_end"] = load_average()
    print(json.dumps(out))


def _cpu_model() -> str:
    for line in os.popen("lscpu").read().splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
