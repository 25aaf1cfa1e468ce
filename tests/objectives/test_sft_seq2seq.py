"""SFT of an encoder-decoder (T5): seq2seq examples as transformers builds a T5 batch, packed
(T5X-style) and padded batches with equal losses, the trainer's encoder-decoder ModelFns, held-out
scoring, and the objectives that refuse an encoder-decoder with a clear error."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import batch as batch_lib, evaluate, models, objectives, sharding
from jaxtune.config import base_config
from jaxtune.data import pipeline
from jaxtune.data.examples import ExampleBuilder, TaskSpec, seq2seq_example
from jaxtune.data.flan import FlanSpec
from jaxtune.errors import UserError
from jaxtune.models import t5
from jaxtune.objectives.sft import sft_sums
from jaxtune.trainer.step import Seq2SeqApply, make_apply_fn
from tests.data.test_pipeline import TEMPLATES, CharTokenizer, _records


def _builder(records, **task):
    spec = TaskSpec("default", records, flan={"default": FlanSpec(tuple(TEMPLATES["default"]))}, seq2seq=True, **task)
    return ExampleBuilder(spec, 0, CharTokenizer(), seq_len=64, seed=0)


def test_an_example_is_prompt_to_encoder_and_target_to_decoder():
    tok = CharTokenizer()
    builder = _builder(_records(6))
    example = builder(3, _records(6)[3])
    prompt, target = builder.render(_records(6)[3], 3)
    assert example["inputs"].tolist() == tok.encode(prompt) + [tok.eos_id]  # tokenizer(prompt): ids + </s>
    assert example["targets"].tolist() == tok.encode(target) + [tok.eos_id]  # the labels
    # decoder_input_ids as transformers derives them from the labels
    assert example["decoder_inputs"].tolist() == np.asarray(t5.shift_right(example["targets"][None], 0))[0].tolist()
    assert example["loss_mask"].tolist() == [1] * len(example["targets"])
    # few-shot: the exemplars are part of the encoder input, the target is the example's alone
    shots = _builder(_records(6), few_shot=2)(3, _records(6)[3])
    assert len(shots["inputs"]) > len(example["inputs"]) and shots["targets"].tolist() == example["targets"].tolist()
    # a conversation has no encoder/decoder split
    chat = ExampleBuilder(TaskSpec("chat", [{"messages": []}], chat_template="{{ x }}", seq2seq=True), 0, tok,
                          seq_len=64, seed=0)
    with pytest.raises(UserError, match=r"task 'chat' reads conversations.*encoder-decoder"):
        chat(0, {"messages": []})


def test_seq2seq_truncation_policies_keep_the_closing_eos():
    enc, tgt = [5, 6, 7, 8, 9, 1], [20, 21, 1]
    ex, cut = seq2seq_example(enc, tgt, decoder_start_id=0, seq_len=4, truncation="truncate")
    assert cut and ex["inputs"].tolist() == [5, 6, 7, 1] and ex["targets"].tolist() == [20, 21, 1]
    assert seq2seq_example(enc, tgt, decoder_start_id=0, seq_len=4, truncation="drop") == (None, False)
    with pytest.raises(UserError, match=r"rec\.jsonl:2: the input \(encoder\) has 6 tokens, more than data\.seq_len=4"):
        seq2seq_example(enc, tgt, decoder_start_id=0, seq_len=4, truncation="error", where="rec.jsonl:2")


def _examples(n):
    builder = _builder(_records(n))
    return [{k: v for k, v in builder(i, r).items() if not k.startswith("_")} for i, r in enumerate(_records(n))]


def _loss_sums(fns, params, batches, rows=2):
    """(summed loss, trained tokens) over `batches`, each padded to `rows` rows (one compile)."""
    sums = jax.jit(lambda p, b: sft_sums(fns.token_stats(p, b), b["loss_mask"]))
    totals = np.zeros(2)
    for b in batches:
        b = {k: np.pad(v, ((0, rows - len(v)), (0, 0))) for k, v in b.items()}
        loss, metrics = sums(params, b)
        totals += [float(loss), float(metrics["trained_tokens"])]
    return totals


def test_packed_encoder_decoder_loss_equals_unpacked():
    """T5X-style rows (several examples per row in both streams, segment k paired with segment k)
    give the SFT loss of the same examples one per padded row, through the trainer's ModelFns."""
    seq_len = 64
    examples = _examples(12)
    config = models.get_config("t5", "tiny-v1.1", vocab_size=CharTokenizer.vocab_size)
    model = models.build(config)
    params = sharding.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    fns = make_apply_fn(model, logits_chunk=16)  # the LM head in chunks, as in training
    assert isinstance(fns, Seq2SeqApply)

    padded = [{k: np.stack([pipeline.pad_seq2seq_example(e, seq_len)[k] for e in examples[i : i + 2]])
               for k in batch_lib.SEQ2SEQ_BATCH_KEYS} for i in range(0, 12, 2)]
    it = grain.MapDataset.source(examples).to_iter_dataset()
    packed = list(pipeline.pack_examples(it, seq_len=seq_len, bins=2, seq2seq=True).batch(2, drop_remainder=False))
    assert set(packed[0]) == set(batch_lib.SEQ2SEQ_BATCH_KEYS)
    assert sum(b["segment_ids"].max(axis=1).sum() for b in packed) == 12  # every example, several per row
    assert max(b["decoder_segment_ids"].max() for b in packed) >= 3
    for b in packed:  # both streams hold the same segments, positions restart per segment
        for enc, dec in zip(b["segment_ids"], b["decoder_segment_ids"]):
            assert set(enc.tolist()) - {0} == set(dec.tolist()) - {0}
        first = (b["decoder_positions"] == 0) & (b["decoder_segment_ids"] > 0)
        assert (b["decoder_inputs"][first] == config.decoder_start_token_id).all()
    unpacked_loss, unpacked_tokens = _loss_sums(fns, params, padded)
    packed_loss, packed_tokens = _loss_sums(fns, params, packed)
    assert packed_tokens == unpacked_tokens == sum(len(e["targets"]) for e in examples)
    np.testing.assert_allclose(packed_loss, unpacked_loss, rtol=2e-5)

    # held-out scoring (jaxtune eval's loss) computes the same log-likelihood of the targets
    tok = CharTokenizer()
    builder = _builder(_records(12))
    held_out = [dict(zip(("prompt", "answer"), builder.render(r, i))) for i, r in enumerate(_records(12))]
    scores = evaluate.loss_scores(model, {"params": params}, tok, held_out, seq_len=seq_len, batch_size=8)
    np.testing.assert_allclose(scores["loss"], unpacked_loss / unpacked_tokens, rtol=2e-5)


def test_objectives_without_encoder_decoder_support_refuse_a_t5_clearly():
    c = base_config()
    c.model.family, c.model.variant = "t5", "tiny"
    assert objectives.build(c).encoder_decoder  # sft trains it (and dpo/kto: tests/objectives/test_preference_seq2seq.py)
    for name in ("reward", "grpo"):
        c.objective.type = name
        with pytest.raises(UserError, match=rf"'model.family' is 't5'.*encoder-decoder.*objective.type='{name}'.*sft"):
            objectives.build(c)
