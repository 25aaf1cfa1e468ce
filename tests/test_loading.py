"""jaxtune/loading.py: one tokenizer resolution for training (every objective), generate/eval/export."""

from __future__ import annotations

import json

import pytest

from jaxtune import config as config_lib
from jaxtune import loading, objectives, workdir as workdir_lib
from jaxtune.data.tokenizers import load_tokenizer, train_sentencepiece
from tests import helpers
from tests.models.test_hf_io import _write_hf_tokenizer


def _sentencepiece(path, vocab_size=300):
    texts = [" ".join(helpers.WORDS[(i * 3 + j) % len(helpers.WORDS)] for j in range(6)) for i in range(300)]
    train_sentencepiece(texts, path.with_suffix(""), vocab_size=vocab_size)
    return path


def test_tokenizer_path_precedence(tmp_path):
    """data.tokenizer > model.hf_dir > the workdir's own > model.init_from's > (to be trained into) the workdir's."""
    c = config_lib.base_config()
    run, start = tmp_path / "run", tmp_path / "sft_run"
    run.mkdir()
    start.mkdir()
    assert loading.tokenizer_path(c) is None
    assert loading.tokenizer_path(c, run) == run / workdir_lib.TOKENIZER_FILE  # not there yet: trained there
    c.model.init_from = str(start)
    assert loading.tokenizer_path(c, run) == run / workdir_lib.TOKENIZER_FILE  # init_from has none
    _sentencepiece(start / workdir_lib.TOKENIZER_FILE)
    assert loading.tokenizer_path(c, run) == start / workdir_lib.TOKENIZER_FILE  # the starting run's ids
    _sentencepiece(run / workdir_lib.TOKENIZER_FILE)
    assert loading.tokenizer_path(c, run) == run / workdir_lib.TOKENIZER_FILE  # a resumed run keeps its own
    c.model.hf_dir = str(tmp_path / "hf")
    assert loading.tokenizer_path(c, run) == tmp_path / "hf"
    c.data.tokenizer = str(tmp_path / "tok.model")
    assert loading.tokenizer_path(c, run) == tmp_path / "tok.model"


def _prompts(path, n=8):
    path.write_text("".join(json.dumps({"prompt": f"{helpers.WORDS[i % len(helpers.WORDS)]} =",
                                        "response": " ok", "chosen": " ok", "rejected": " no", "answer": "1"}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.parametrize("objective", ["sft", "dpo", "grpo"])
def test_every_objective_reads_the_model_dirs_own_tokenizer(tmp_path, objective):
    """With model.hf_dir and no data.tokenizer, SFT, DPO and GRPO all use the model's tokenizer (GRPO
    once trained a new 512-piece tokenizer into the workdir instead); nothing is trained."""
    hf = tmp_path / "hf"
    fast = _write_hf_tokenizer(hf)
    c = config_lib.base_config()
    c.objective.type = objective
    c.model.hf_dir = str(hf)
    c.data.train_path = str(_prompts(tmp_path / "train.jsonl"))
    c.data.templates = (("{prompt}", "{response}"),)
    c.objective.prompts = "jsonl"
    run = tmp_path / "run"
    tokenizer = objectives.build(c).load_data(run).tokenizer
    assert tokenizer.vocab_size == len(fast) and tokenizer.encode("cat dog") == fast.encode("cat dog")
    assert not (run / workdir_lib.TOKENIZER_FILE).exists()


def test_a_chain_of_runs_keeps_the_first_runs_tokenizer(tmp_path):
    """GRPO from DPO from SFT: the DPO run trained no tokenizer of its own (it used the SFT run's), so
    its saved config's model.init_from is followed back to the SFT run's ids."""
    import jax.numpy as jnp

    from jaxtune import checkpoint as checkpoint_lib
    sft, dpo, grpo = tmp_path / "sft", tmp_path / "dpo", tmp_path / "grpo"
    for run in (sft, dpo, grpo):
        run.mkdir()
    _sentencepiece(sft / workdir_lib.TOKENIZER_FILE)
    saver = checkpoint_lib.Checkpointer(dpo, every=1, keep=1, use_async=False)
    saver.save(1, {"w": jnp.zeros(2)}, None, {"model": {"init_from": str(sft)}, "data": {"tokenizer": ""}})
    saver.close()
    c = config_lib.base_config()
    c.model.init_from = str(dpo)
    assert loading.tokenizer_path(c, grpo) == sft / workdir_lib.TOKENIZER_FILE
    hf = tmp_path / "tok"
    saver = checkpoint_lib.Checkpointer(sft, every=1, keep=1, use_async=False)  # a chain that started from a tokenizer
    (sft / workdir_lib.TOKENIZER_FILE).unlink()
    saver.save(1, {"w": jnp.zeros(2)}, None, {"model": {"init_from": ""}, "data": {"tokenizer": str(hf)}})
    saver.close()
    assert loading.tokenizer_path(c, grpo) == hf


@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_every_objective_starts_from_init_froms_tokenizer(tmp_path, objective):
    """model.init_from without data.tokenizer: the starting run's trained tokenizer, whose ids its weights know."""
    start = tmp_path / "sft_run"
    start.mkdir()
    _sentencepiece(start / workdir_lib.TOKENIZER_FILE)
    c = config_lib.base_config()
    c.objective.type = objective
    c.model.init_from = str(start)
    c.data.train_path = str(_prompts(tmp_path / "train.jsonl"))
    c.data.templates = (("{prompt}", "{response}"),)
    c.objective.prompts = "jsonl"
    run = tmp_path / "run"
    tokenizer = objectives.build(c).load_data(run).tokenizer
    own = load_tokenizer(start / workdir_lib.TOKENIZER_FILE)
    assert tokenizer.vocab_size == own.vocab_size and tokenizer.encode("red cat") == own.encode("red cat")
    assert not (run / workdir_lib.TOKENIZER_FILE).exists()


def test_encoder_decoder_models_are_recognised_by_family_and_hf_dir(tmp_path):
    """A T5 named by model.family or by model.hf_dir: runs build it (its config has no `attention`
    field), the data settings ask for encoder-decoder examples, and objectives that feed
    decoder-only batches refuse it (tests/objectives/test_sft_seq2seq.py)."""
    import jax

    from jaxtune import models, sharding

    c = config_lib.base_config()
    c.model.family, c.model.variant = "t5", "tiny"
    assert loading.is_encoder_decoder(c) and loading.data_settings(c).seq2seq
    assert loading.model_config_from(c).model_type == "t5"
    config = models.get_config("t5", "tiny")
    params = sharding.unbox(models.build(config).init(jax.random.key(0), jax.numpy.zeros((1, 2), "int32"))["params"])
    out = models.save_pretrained(config, params, tmp_path / "t5")
    c = config_lib.base_config()
    c.model.hf_dir = str(out)
    assert loading.encoder_decoder_family(c) == f"model.hf_dir {out} (model_type 't5')"
    assert loading.model_config_from(c).num_layers == config.num_layers
    c = config_lib.base_config()
    assert not loading.is_encoder_decoder(c) and not loading.data_settings(c).seq2seq
