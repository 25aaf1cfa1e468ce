"""Peak host memory of `jaxtune.models.from_pretrained` on a >= 2 GB bf16 Llama checkpoint.

Writes a synthetic multi-shard bf16 safetensors checkpoint (random weights, written tensor by
tensor, so writing needs about one tensor of memory) into a temp dir, then loads it in a fresh
subprocess with `from_pretrained(dtype="bfloat16")` and prints JSON: peak RSS (VmHWM, else ru_maxrss), RSS
after imports, checkpoint size and their ratio (target <= 1.2). On CPU the loaded params live
in host memory too, so the ratio's floor is 1.0 plus the Python/JAX baseline.

    PYTHONPATH=. python benchmarks/load_checkpoint.py [--layers 16] [--devices 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, resource, sys, time
import jax
from jaxtune import models

def peak_kib():
    # VmHWM is per address space, so it restarts at exec; ru_maxrss on Linux can carry over the
    # parent's high-water mark from before the fork (the parent just wrote the checkpoint).
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

jax.devices()
base = peak_kib()
t0 = time.time()
model, params = models.from_pretrained(sys.argv[1], dtype="bfloat16")
jax.block_until_ready(params)
secs = time.time() - t0
peak = peak_kib()
n = sum(x.size for x in jax.tree.leaves(params))
print(json.dumps({"baseline_rss_bytes": base * 1024, "peak_rss_bytes": peak * 1024, "load_s": secs,
                  "num_params": int(n), "devices": len(jax.devices())}))
"""


def write_checkpoint(directory: Path, *, vocab: int, hidden: int, intermediate: int, layers: int, heads: int,
                     kv_heads: int, shard_bytes: int, seed: int = 0) -> int:
    """Writes config.json + model-XXXXX-of-XXXXX.safetensors + index; returns the weight bytes."""
    import ml_dtypes

    from jaxtune.models import hf

    head_dim = hidden // heads
    tensors = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    tensors += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]

    shards: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(directory / fname, "wb") as f:
            f.write(hf._header([(n, "BF16", s, math.prod(s) * 2) for n, s in shard]))
            for name, shape in shard:
                w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
                f.write(w.tobytes())
                weight_map[name] = fname
                total += w.nbytes
                del w
    (directory / hf.INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--shard_mb", type=int, default=500)
    parser.add_argument("--devices", type=int, default=1, help="fake CPU devices in the loading process")
    parser.add_argument("--keep", help="write the checkpoint here (kept) instead of a temp dir")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.keep or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        total = write_checkpoint(
            directory, vocab=args.vocab, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
            heads=args.heads, kv_heads=args.kv_heads, shard_bytes=args.shard_mb * 10**6,
        )
        write_s = time.time() - t0
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        run = subprocess.run([sys.executable, "-c", _CHILD, str(directory)], env=env, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"loading failed:\n{run.stderr}")
        result = json.loads(run.stdout.strip().splitlines()[-1])
    result.update(
        checkpoint_bytes=total,
        write_s=round(write_s, 1),
        load_s=round(result["load_s"], 1),
        peak_rss_over_checkpoint=round(result["peak_rss_bytes"] / total, 3),
        peak_minus_baseline_over_checkpoint=round((result["peak_rss_bytes"] - result["baseline_rss_bytes"]) / total, 3),
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
