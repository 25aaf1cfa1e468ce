"""lm-evaluation-harness on jaxtune models: the same numbers as lm-eval's own `hf` backend.

Tiny random llama (its tokenizer adds BOS) and qwen2 (none) models, each saved as an HF dir with a
byte-level BPE tokenizer, are scored by `JaxtuneLM` and by lm-eval's `HFLM` (transformers, fp32):
per-request log-likelihoods (plain, empty context, rolling) within 1e-4, identical greedy
generations, and identical task metrics on local task YAMLs (multiple choice, rolling
perplexity, generation) run through `jaxtune eval --harness`."""

import json
import textwrap

import numpy as np
import pytest

from jaxtune import cli, harness, inference
from tests.models.hf_reference import random_hf_model, transformers

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "red blue green", "one two three four five",
         "the sun is hot and the moon is cold", "birds fly over the sea"]
MAX_LENGTH = 24  # small, so rolling windows and left truncation are exercised


def _tokenizer(with_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if with_bos else None,
                                                eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="module", params=[("llama", True), ("qwen2", False)], ids=["llama", "qwen2"])
def hf_dir(request, tmp_path_factory):
    family, with_bos = request.param
    tok = _tokenizer(with_bos)
    model = random_hf_model(family, tie=False, unit_offset=False, vocab_size=len(tok), hidden_size=48,
                            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 1
    directory = tmp_path_factory.mktemp(family)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pair(hf_dir):
    from lm_eval.models.huggingface import HFLM

    ours = harness.harness_lm(inference.from_hf_dir(str(hf_dir)), batch_size=4, max_length=MAX_LENGTH)
    ref = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=4, max_length=MAX_LENGTH, device="cpu")
    return ours, ref


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_hf_backend(pair):
    ours, ref = pair
    args = [("the cat", " sat on the mat"), ("", "red blue"), ("a dog ran in the ", "park"),
            (" ".join(TEXTS), " birds fly")]  # the last one is left-truncated to max_length + 1 tokens
    mine, theirs = ours.loglikelihood(_requests("loglikelihood", args)), ref.loglikelihood(_requests("loglikelihood", args))
    np.testing.assert_allclose([m[0] for m in mine], [t[0] for t in theirs], atol=1e-4, rtol=0)
    assert [m[1] for m in mine] == [t[1] for t in theirs]


def test_rolling_loglikelihoods_equal_hf_backend(pair):
    ours, ref = pair
    args = [(TEXTS[0],), (" ".join(TEXTS),)]  # the second spans several windows
    np.testing.assert_allclose(ours.loglikelihood_rolling(_requests("loglikelihood_rolling", args)),
                               ref.loglikelihood_rolling(_requests("loglikelihood_rolling", args)), atol=1e-4, rtol=0)


def test_greedy_generations_equal_hf_backend(pair):
    ours, ref = pair
    args = [("the cat", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}),  # one max_gen_toks: one compile
            ("one two", {"until": ["three", "mat"], "max_gen_toks": 5}),
            ("birds", {"max_gen_toks": 5}), ("the sun is hot and", {"until": [" "], "max_gen_toks": 5})]
    assert ours.generate_until(_requests("generate_until", args)) == ref.generate_until(_requests("generate_until", args))


def _tasks(root):
    root.mkdir(parents=True, exist_ok=True)
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t, "question": t.rsplit(" ", 1)[0], "choices": t.split()[-3:],
                                        "label": 2}) + "\n" for t in TEXTS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\ntest_split: test\n"
    (root / "tiny_mc.yaml").write_text(f"task: tiny_mc\n{common}output_type: multiple_choice\n"
                                       "doc_to_text: '{{question}}'\ndoc_to_target: label\ndoc_to_choice: choices\n"
                                       "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "tiny_ppl.yaml").write_text(f"task: tiny_ppl\n{common}output_type: loglikelihood_rolling\n"
                                        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                                        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (root / "tiny_gen.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_gen
        {common.replace(chr(10), chr(10) + '        ')}output_type: generate_until
        doc_to_text: '{{{{question}}}}'
        doc_to_target: '{{{{choices[2]}}}}'
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 5
          do_sample: false
        metric_list:
          - metric: exact_match
        """))
    return root


def test_task_metrics_equal_hf_backend_through_the_cli(pair, hf_dir, tmp_path):
    assert_cli_metrics_equal_hf_backend(hf_dir, pair[1], tmp_path)


def assert_cli_metrics_equal_hf_backend(model_dir, ref, tmp_path):
    """`jaxtune eval --harness` on `model_dir` gives every task metric lm-eval's `hf` backend `ref`
    gives (decoder-only and seq2seq alike)."""
    tasks = _tasks(tmp_path / "tasks")
    out = tmp_path / "results.json"
    argv = ["eval", "--hf_dir", str(model_dir), "--harness", "tiny_mc,tiny_ppl,tiny_gen", "--harness_include", str(tasks),
            "--harness_max_length", str(MAX_LENGTH), "--output", str(out)]
    assert cli.main(argv) == 0
    mine = json.loads(out.read_text())["results"]
    theirs = harness.run_harness(ref, ["tiny_mc", "tiny_ppl", "tiny_gen"], include_path=str(tasks))["results"]
    for task in theirs:
        for key, value in theirs[task].items():
            if isinstance(value, float) and "stderr" not in key:
                # perplexities are exp(-mean log-likelihood): a 1e-6 relative error there is ~1e-6 in log p
                assert mine[task][key] == pytest.approx(value, rel=1e-6, abs=1e-4), (task, key)
