"""Preference objectives (dpo, kto) on an encoder-decoder (T5): pairs as TRL built them for
encoder-decoders (the prompt is each row's encoder input, each completion its decoder labels),
their log-probs through the trainer's encoder-decoder ModelFns, the reference models, and the
layouts that are refused with a clear error (packed pairs, chat records)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import batch as batch_lib, models, objectives, validation
from jaxtune.config import base_config
from jaxtune.data import preference
from jaxtune.errors import UserError
from jaxtune.models import t5
from jaxtune.objectives import pairs
from jaxtune.peft import base as peft_base, wrapper
from jaxtune.trainer.step import make_apply_fn
from tests.data.test_pipeline import CharTokenizer

TEMPLATES = {"default": [("Q: {prompt}", "{response}")]}
RECORDS = [{"prompt": f"p{i}", "chosen": "yes" + "s" * (i % 3), "rejected": "no"} for i in range(6)]
UNPAIRED = [{"prompt": f"p{i}", "completion": "yes" * (1 + i % 2), "label": i % 2 == 0} for i in range(4)]
SEQ = 12


def _transform(records=RECORDS, **kw):
    kw = {"seq_len": SEQ, "truncation": "truncate", "seed": 0, "seq2seq": True, **kw}
    return preference.PreferenceTransform(records, TEMPLATES, CharTokenizer(), **kw)


def test_a_pair_is_the_prompt_on_the_encoder_and_each_completion_on_the_decoder():
    tok = CharTokenizer()
    rows = _transform()(1, RECORDS[1])
    assert tuple(k for k in preference.batch_keys(_transform()) if k in rows) == batch_lib.SEQ2SEQ_BATCH_KEYS + (
        preference.INDEX_KEY,)
    prompt = tok.encode("Q: p1") + [tok.eos_id]  # tokenizer(prompt): no BOS, a closing </s>
    for side, text in enumerate(("yess", "no")):
        labels = tok.encode(text) + [tok.eos_id]
        n, m = len(prompt), len(labels)
        assert rows["inputs"][side, :n].tolist() == prompt and not rows["inputs"][side, n:].any()
        assert rows["segment_ids"][side].tolist() == [1] * n + [0] * (SEQ - n)
        assert rows["targets"][side, :m].tolist() == labels
        # decoder_input_ids as transformers derives them from the labels (start token = pad id 0)
        assert rows["decoder_inputs"][side, :m].tolist() == np.asarray(t5.shift_right(jnp.array([labels]), 0))[0].tolist()
        assert rows["loss_mask"][side].tolist() == [1] * m + [0] * (SEQ - m)  # every label token is scored
        assert rows["decoder_segment_ids"][side].tolist() == [1] * m + [0] * (SEQ - m)
        assert rows["decoder_positions"][side, :m].tolist() == list(range(m))
    # KTO: row 1 is the same prompt with the next record's completion (the KL row)
    kto = _transform(UNPAIRED, unpaired=True)(0, UNPAIRED[0])
    assert kto["inputs"][0].tolist() == kto["inputs"][1].tolist()
    assert kto["targets"][1, :7].tolist() == tok.encode("yesyes") + [tok.eos_id] and kto[preference.LABEL_KEY] == 1


def test_seq2seq_pairs_truncate_each_stream_and_drop_what_is_left_without_a_preference():
    tok = CharTokenizer()
    long = {"prompt": "a long prompt here", "chosen": "c" * 20, "rejected": "d" + "c" * 19}
    transform = _transform([long])
    rows = transform(0, long)  # both streams cut to SEQ, keeping the start and the closing </s>
    assert rows["inputs"][0].tolist() == (tok.encode("Q: a long prompt here")[:SEQ - 1] + [tok.eos_id])
    assert rows["targets"][0].tolist() == tok.encode("c" * (SEQ - 1)) + [tok.eos_id]
    assert transform.stats.truncated == 1
    # cut to the same labels: no preference left, the pair is dropped and counted
    same = {"prompt": "p", "chosen": "c" * 20 + "x", "rejected": "c" * 20 + "y"}
    dropping = _transform([same])
    assert dropping(0, same) is None and dropping.stats.dropped == 1
    assert _transform([long], truncation="drop")(0, long) is None
    with pytest.raises(UserError, match=r"record 0: the input \(encoder\) has 22 tokens, more than data.seq_len=12"):
        _transform([long], truncation="error")(0, long)


def test_chat_pairs_are_refused_for_an_encoder_decoder():
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(UserError, match=r"record 0: chat messages have no encoder/decoder split"):
        _transform([record], chat_template="{{ messages }}")(0, record)


def _t5_config(**model):
    c = base_config()
    c.model.family, c.model.variant = "t5", "tiny"
    c.objective.type = "dpo"
    objectives.base.select(c)
    c.data.train_path, c.data.builtin, c.data.packing = "pairs.jsonl", "", False
    for k, v in model.items():
        c.model[k] = v
    return c


def test_dpo_and_kto_take_a_t5_and_packed_pairs_are_refused_clearly():
    c = _t5_config()
    objective = objectives.build(c)
    assert objective.encoder_decoder and set(objective.batch_shapes(2)) >= set(batch_lib.SEQ2SEQ_BATCH_KEYS)
    assert objective.batch_shapes(2)["decoder_inputs"].shape == (2, 2, c.data.seq_len)
    validation.validate(c)
    c.data.packing = True
    with pytest.raises(UserError, match=r"'data.packing' is True, but config key 'model.family' is 't5'.*encoder-decoder"
                                        r".*set data.packing=False"):
        validation.validate(c)
    c.objective.type = "kto"
    objectives.base.select(c)
    assert objectives.build(c).encoder_decoder
    with pytest.raises(UserError, match=r"'data.packing' is True.*encoder-decoder"):
        validation.validate(c)


def _pair_batch(n=3):
    transform = _transform()
    rows = [transform(i, RECORDS[i]) for i in range(n)]
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in preference.batch_keys(transform)}


@pytest.mark.slow  # a T5 forward compiles for minutes on a loaded 2-core machine
def test_pair_log_probs_are_the_decoder_labels_given_the_prompt_and_the_lora_reference_is_the_base():
    config = models.get_config("t5", "tiny", vocab_size=259, num_layers=1)
    model = models.build(config)
    batch = _pair_batch()
    params = model.init(jax.random.key(0), batch["inputs"][:, 0])["params"]
    adapted = wrapper.wrap(model, peft_base.Spec(method="lora", rank=2, alpha=4.0, targets=("q", "v")))
    lora = jax.tree.map(lambda x: x + 0.5, adapted.init(jax.random.key(1), batch["inputs"][:, 0])["lora"])
    dpo = objectives.build(_t5_config())
    c = _t5_config()
    c.peft.method = "lora"
    lora_dpo = objectives.build(c)
    assert (dpo.reference_kind(), lora_dpo.reference_kind()) == ("copy", "base")
    fns, lora_fns = make_apply_fn(model, logits_chunk=4), make_apply_fn(adapted, logits_chunk=4)  # chunked LM head

    @jax.jit
    def run(params, lora, batch):
        rows = {k: v.reshape(-1, SEQ) for k, v in batch.items() if v.ndim == 3}
        logits = model.apply({"params": params}, rows["inputs"], segment_ids=rows["segment_ids"],
                             decoder_inputs=rows["decoder_inputs"], decoder_segment_ids=rows["decoder_segment_ids"])
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), rows["targets"][..., None], -1)[..., 0]
        direct = jnp.sum(jnp.where(rows["loss_mask"] > 0, logp, 0.0), -1).reshape(-1, 2)
        return (direct, pairs.pair_scores(fns, params, batch), dpo.reference_logps(fns, batch, None, params),
                lora_dpo.reference_logps(lora_fns, batch, params, None),
                pairs.pair_scores(lora_fns, lora, batch, frozen=params)[0], lora_dpo.loss(lora_fns, lora, batch, frozen=params))

    direct, (logps, lengths), copy_ref, base_ref, policy, (loss, metrics) = run(params, lora, batch)
    np.testing.assert_allclose(logps, direct, rtol=1e-5)  # log p(labels | prompt), the LM head in chunks
    np.testing.assert_array_equal(lengths, batch["loss_mask"].sum(-1))
    np.testing.assert_allclose(copy_ref, logps)  # the frozen copy of the start weights
    np.testing.assert_allclose(base_ref, logps, rtol=1e-6)  # LoRA: the base without its adapters
    assert not np.allclose(policy, logps) and np.isfinite(loss) and metrics["rewards/chosen"] != 0.0
