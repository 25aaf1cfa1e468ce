"""Sampling throughput: prefill and decode tokens/s of jaxtune's KV-cache sampler vs transformers.

    python benchmarks/generate.py                        # quickstart model shape, batch 16
    python benchmarks/generate.py --batch 8 --prompt_len 128 --new_tokens 128

Both run greedy generation of the same random-weight model (weights copied into the HF model)
on this machine's CPU. prefill tokens/s = batch * prompt_len / time(1 new token);
decode tokens/s = batch * (new_tokens - 1) / (time(new_tokens) - time(1 new token)).
Medians of --repeats timed runs after a warm-up (jaxtune's compile is excluded). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import models
from jaxtune.generate import generate
from jaxtune.models import hf_mapping


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rates(run, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, float]:
    one = _median_seconds(lambda: run(1), repeats)
    full = _median_seconds(lambda: run(new_tokens), repeats)
    return {"prefill_tokens_per_s": batch * prompt_len / one, "decode_tokens_per_s": batch * (new_tokens - 1) / (full - one)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llama")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()

    # The quickstart shape (as benchmarks/train_step.py): d128, 4 layers, vocab 512.
    cfg = models.get_config(args.family, "tiny", vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                            num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    model = models.build(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt_len))
    prompt_lists = prompts.tolist()

    def run_jax(n):
        return generate(model, params, prompt_lists, max_new_tokens=n)

    result = {"family": args.family, "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "device": jax.devices()[0].platform, "load_avg": os.getloadavg()[0]}
    result["jaxtune"] = _rates(run_jax, args.batch, args.prompt_len, args.new_tokens, args.repeats)

    if args.transformers:
        import torch
        import transformers

        fam = models.FAMILIES[args.family]
        hf = {k: v for k, v in fam.config_to_hf(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
        hf_cfg = transformers.AutoConfig.for_model(fam.config_to_hf(cfg)["model_type"], **hf)
        ref = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
        sd = hf_mapping.state_dict_from_params(fam.hf_param_maps(cfg), params)
        ref.load_state_dict({k: torch.tensor(np.asarray(w)) for k, w in sd.items()}, strict=False)
        ref.tie_weights()
        ids = torch.tensor(prompts)
        mask = torch.ones_like(ids)

        def run_hf(n):
            with torch.no_grad():
                return ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                    min_new_tokens=n, pad_token_id=0)

        result["transformers"] = _rates(run_hf, args.batch, args.prompt_len, args.new_tokens, args.repeats)
        result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
