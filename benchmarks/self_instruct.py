"""Self-Instruct / Evol-Instruct generation throughput with jaxtune's sampler on this machine.

    PYTHONPATH=. python benchmarks/self_instruct.py                      # quickstart model shape
    PYTHONPATH=. python benchmarks/self_instruct.py --batches 3 --batch_size 16 --max_new_tokens 128

A random-weight model (the quickstart shape: d128, 4 layers; a sentencepiece tokenizer trained on
the seed tasks) serves `jaxtune data self-instruct` and `jaxtune data evolve` through
`ModelSampler`. A random model writes no parseable task lists, so by default (`--canned`) every
sampler call runs the model for real (same prompts, same shapes, all tokens generated) but its
text is replaced by the tests' canned completions (tests/datatools/fakes.py), which pass the
filters about as often as a cooperative model: the compute per instruction is real, the yield is
the canned one. `--no-canned` measures the raw model (stage 1 only, nothing kept). The first
batch (compiles) is excluded. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import inference, models, sharding
from jaxtune.data.tokenizers import train_sentencepiece
from jaxtune.datatools import evolve, self_instruct
from jaxtune.datatools.sampling import Completion, ModelSampler
from tests.datatools.fakes import SEED_TASKS, FakeSampler, write_seed_file


class CannedText:
    """Runs the real sampler, then swaps in canned text (token counts stay the model's)."""

    def __init__(self, sampler):
        self.sampler, self.fake = sampler, FakeSampler()

    def complete(self, prompts, **kwargs):
        real = self.sampler.complete(prompts, **kwargs)
        canned = self.fake.complete(prompts, **kwargs)
        return [Completion(c.text, r.num_tokens, c.truncated) for r, c in zip(real, canned)]


def _hf_dir(root: Path) -> Path:
    texts = [json.dumps(t) for t in SEED_TASKS] * 20
    train_sentencepiece(texts, root / "tok" / "tokenizer", vocab_size=512)
    cfg = models.get_config("llama", "tiny", vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                            num_heads=4, num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=4096)
    model = models.build(cfg)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32)), jax.random.key(0))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.05).astype(a.dtype), sharding.unbox(shapes))
    models.save_pretrained(cfg, params, root / "hf", tokenizer_dir=str(root / "tok"))
    return root / "hf"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=2, help="timed batches (after one warm-up batch)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--canned", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp())
    loaded = inference.load(workdir=None, hf_dir=str(_hf_dir(root)))
    sampler = ModelSampler(loaded, batch_size=64)
    sampler = CannedText(sampler) if args.canned else sampler
    seeds = self_instruct.read_seed_tasks(str(write_seed_file(root / "seeds.jsonl")))
    settings = self_instruct.Settings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                      instance_max_new_tokens=args.max_new_tokens, num_seed_examples=3)
    out = {"backend": jax.default_backend(), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
           "canned": args.canned}
    self_instruct.generate(sampler, seeds, output=str(root / "si.jsonl"), num_instructions=10**6, settings=settings,
                           stop_after_batches=1)  # warm-up: compiles
    t0 = time.perf_counter()
    r = self_instruct.generate(sampler, seeds, output=str(root / "si.jsonl"), num_instructions=10**6,
                               settings=settings, stop_after_batches=args.batches)
    wall = time.perf_counter() - t0
    out["self_instruct"] = {"requests_per_s": r.requests / wall, "instructions_per_s": r.new_instructions / wall,
                            "generated_tokens_per_s": r.generated_tokens / r.sampler_seconds,
                            "sampler_share": r.sampler_seconds / wall, "instructions": r.new_instructions}
    items = [evolve.Item(f"s{i}", f"s{i}", t.instruction) for i, t in enumerate(seeds)] * (args.batch_size // 2)
    ev_settings = evolve.Settings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  response_max_new_tokens=args.max_new_tokens)
    evolve.evolve(sampler, items, output=str(root / "ev.jsonl"), rounds=1, settings=ev_settings)  # warm-up
    t0 = time.perf_counter()
    e = evolve.evolve(sampler, items, output=str(root / "ev.jsonl"), rounds=1 + args.batches, settings=ev_settings)
    wall = time.perf_counter() - t0
    out["evolve"] = {"evolutions_per_s": e.evolutions / wall, "kept_per_s": e.new_records / wall,
                     "generated_tokens_per_s": e.generated_tokens / e.sampler_seconds}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
