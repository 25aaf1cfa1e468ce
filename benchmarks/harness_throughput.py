"""lm-evaluation-harness requests/s: jaxtune's backend vs lm-eval's `hf` backend on one tiny model,
and IFEval scoring speed (responses/s) with no model.

    python benchmarks/harness_throughput.py                      # tiny random llama, 64 requests of each type
    python benchmarks/harness_throughput.py --requests 128 --hidden 256 --layers 4
    python benchmarks/harness_throughput.py --ifeval ../shared/data/ifeval_input_data.jsonl

Builds a random HF llama and a byte-level BPE tokenizer in a temp dir (nothing downloaded), then
times loglikelihood, loglikelihood_rolling and generate_until (greedy, 16 tokens) on the same
requests for both backends: a first pass (jaxtune: compiles included) and a second, warm pass.
With --ifeval, also scores every prompt's own text as its response, strict and loose (all 25
checkers, punkt and langdetect included). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time


def _hf_dir(root, hidden, layers):
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "a", "dog", "ran", "in", "the", "park", "while", "birds", "fly", "over", "the", "sea"]
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    model.save_pretrained(root)
    fast.save_pretrained(root)
    return texts


def _requests(texts, n):
    from lm_eval.api.instance import Instance

    pick = [texts[i % len(texts)] for i in range(n)]
    return {
        "loglikelihood": [Instance("loglikelihood", {}, (t.rsplit(" ", 2)[0], " " + " ".join(t.split()[-2:])), i)
                          for i, t in enumerate(pick)],
        "loglikelihood_rolling": [Instance("loglikelihood_rolling", {}, (t + " " + t,), i) for i, t in enumerate(pick)],
        "generate_until": [Instance("generate_until", {}, (t[: 12 + i % 20], {"until": ["\n"], "max_gen_toks": 16}), i)
                           for i, t in enumerate(pick)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--ifeval", default=None, help="IFEval's input_data.jsonl: time scoring its prompts as responses")
    args = parser.parse_args()

    from lm_eval.models.huggingface import HFLM

    from jaxtune import harness, inference

    with tempfile.TemporaryDirectory() as root:
        texts = _hf_dir(root, args.hidden, args.layers)
        backends = {"jaxtune": harness.harness_lm(inference.from_hf_dir(root), batch_size=args.batch_size, max_length=512),
                    "hf": HFLM(pretrained=root, dtype="float32", batch_size=args.batch_size, max_length=512, device="cpu")}
        for kind, requests in _requests(texts, args.requests).items():
            for name, lm in backends.items():
                for attempt in ("first", "warm"):
                    start = time.perf_counter()
                    getattr(lm, kind)(requests)
                    seconds = time.perf_counter() - start
                    print(json.dumps({"backend": name, "request": kind, "pass": attempt, "requests": len(requests),
                                      "seconds": round(seconds, 3), "requests_per_s": round(len(requests) / seconds, 1)}),
                          flush=True)
    if args.ifeval:
        from jaxtune import evaluate
        from jaxtune.data.ifeval import constraints_from_ifeval
        from jaxtune.rewards.instructions import as_constraints

        with open(args.ifeval) as f:
            records = [json.loads(line) for line in f]
        constraints = [as_constraints(constraints_from_ifeval(r, "x")) for r in records]
        start = time.perf_counter()
        evaluate.instruction_scores([r["prompt"] for r in records], constraints)
        seconds = time.perf_counter() - start
        print(json.dumps({"ifeval_responses": len(records), "seconds": round(seconds, 2),
                          "responses_per_s": round(len(records) / seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
