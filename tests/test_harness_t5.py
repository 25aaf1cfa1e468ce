"""lm-evaluation-harness on an encoder-decoder (T5): the numbers of lm-eval's own `hf` seq2seq backend.

A tiny random `transformers` T5 saved with a byte-level BPE tokenizer whose `tokenizer(text)` ends
in `</s>` (as T5's does) is scored by `JaxtuneLM` and by lm-eval's `HFLM` (which picks its
seq2seq backend from the model type): per-request log-likelihoods of the decoder targets given
the encoder input (plain, empty context, left-truncated context, rolling) within 1e-4 and the same
greedy verdicts, and the CLI run of local task YAMLs (multiple choice, rolling perplexity,
generation) gives the same task metrics (slow). The fast tests check the definition against
`transformers` directly: log p(labels | input_ids) and greedy `generate`.

Generation: lm-eval's `hf` backend lets a seq2seq decoder run to (padded context length +
max_gen_toks) tokens; jaxtune stops at max_gen_toks, so a random model's rambling answers can be
longer there (the generation task below stops at a newline within 5 tokens, as answers do)."""


import numpy as np
import pytest

from jaxtune import harness, inference
from tests.models.hf_reference import transformers
from tests.test_harness import MAX_LENGTH, TEXTS, _requests, assert_cli_metrics_equal_hf_backend

lm_eval = pytest.importorskip("lm_eval")


def _t5_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    import torch

    tok = _t5_tokenizer()
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    directory = tmp_path_factory.mktemp("t5")
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ours(t5_dir):
    return harness.harness_lm(inference.from_hf_dir(str(t5_dir)), batch_size=4, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def pair(ours, t5_dir):
    from lm_eval.models.huggingface import HFLM

    ref = HFLM(pretrained=str(t5_dir), dtype="float32", batch_size=4, max_length=MAX_LENGTH, device="cpu")
    assert ref.backend == "seq2seq" and ours.backend == "seq2seq"
    return ours, ref


@pytest.fixture(scope="module")
def hf_t5(t5_dir):
    return (transformers.T5ForConditionalGeneration.from_pretrained(str(t5_dir)).eval(),
            transformers.AutoTokenizer.from_pretrained(str(t5_dir)))


def test_seq2seq_loglikelihood_is_transformers_label_loss(ours, hf_t5):
    """The definition: sum log p(labels | input_ids), decoder inputs = labels shifted right, the
    context as `tokenizer(context)` (ending in </s>), the continuation without </s>."""
    import torch

    model, tok = hf_t5
    args = [("one two three", " four five"), ("the cat sat on the", " mat"), ("", "red blue")]
    mine = ours.loglikelihood(_requests("loglikelihood", args))
    for (context, continuation), (logp, greedy) in zip(args, mine):
        labels = tok(continuation, add_special_tokens=False).input_ids
        inputs = tok(context).input_ids if context else [tok.eos_token_id]  # lm-eval: an empty context is its prefix token
        if not context and labels[0] == tok.eos_token_id:
            inputs, labels = labels[:1], labels[1:]
        assert ours.tok_encode(context or "x")[-1] == tok.eos_token_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([inputs]), labels=torch.tensor([labels])).logits[0]
        expected = torch.log_softmax(logits, -1)[torch.arange(len(labels)), torch.tensor(labels)]
        assert logp == pytest.approx(float(expected.sum()), abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(labels)).all())


def test_seq2seq_greedy_generation_is_transformers_generate(ours, hf_t5):
    """generate_until: at most max_gen_toks decoder tokens (transformers.generate, greedy), cut at `until`."""
    model, tok = hf_t5
    args = [("the cat", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}),
            ("one two", {"until": ["three", "mat"], "max_gen_toks": 5}), ("birds", {"max_gen_toks": 5})]
    mine = ours.generate_until(_requests("generate_until", args))
    for (context, kwargs), text in zip(args, mine):
        out = model.generate(**tok([context], return_tensors="pt"), max_new_tokens=5, do_sample=False)
        expected = tok.decode(out[0], skip_special_tokens=True)
        for stop in kwargs.get("until", []):
            expected = expected.split(stop)[0]
        assert text == expected


@pytest.mark.slow
def test_seq2seq_tokenization_is_the_hf_backends(pair):
    ours, ref = pair
    for text in ("the cat sat", " red blue"):
        assert ours.tok_encode(text) == ref.tok_encode(text)  # ends in </s>
        assert ours.tok_encode(text, add_special_tokens=False) == ref.tok_encode(text, add_special_tokens=False)


@pytest.mark.slow
def test_seq2seq_loglikelihoods_equal_hf_backend(pair):
    ours, ref = pair
    args = [("the cat", " sat on the mat"), ("", "red blue"), ("a dog ran in the ", "park"),
            (" ".join(TEXTS), " birds fly")]  # the last context keeps its last max_length tokens
    mine, theirs = ours.loglikelihood(_requests("loglikelihood", args)), ref.loglikelihood(_requests("loglikelihood", args))
    np.testing.assert_allclose([m[0] for m in mine], [t[0] for t in theirs], atol=1e-4, rtol=0)
    assert [m[1] for m in mine] == [t[1] for t in theirs]
    rolling = [(TEXTS[0],), (" ".join(TEXTS),)]  # the second spans several windows
    np.testing.assert_allclose(ours.loglikelihood_rolling(_requests("loglikelihood_rolling", rolling)),
                               ref.loglikelihood_rolling(_requests("loglikelihood_rolling", rolling)), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_seq2seq_task_metrics_equal_hf_backend_through_the_cli(pair, t5_dir, tmp_path):
    assert_cli_metrics_equal_hf_backend(t5_dir, pair[1], tmp_path)
