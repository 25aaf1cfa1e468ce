"""BOS/EOS as the tokenizer says: jaxtune's token ids equal `transformers`' `tokenizer(text)`.

Tiny byte-level BPE tokenizers are trained here with the `tokenizers` library and saved as Hugging
Face directories that differ only in what their post-processor adds: BOS (Llama-style), nothing
although `<s>` is declared (GPT-2-style), no BOS at all, and BOS + EOS (the first also carries
padding/truncation settings in its tokenizer.json, which `tokenizer(text)` does not apply). Every jaxtune path that
encodes a prompt (SFT examples, preference pairs, KTO examples, evaluation, `generate`) is compared
with `transformers`' tokenizer, and chat examples with `apply_chat_template(tokenize=True)`.
"""

import io
import json
import pickle
import types

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxtune import api, chat_loop, evaluate, loading
from jaxtune import config as config_lib
from jaxtune import generate as generate_lib
from jaxtune import validation
from jaxtune.data import chat as chat_lib
from jaxtune.data import datasets, pipeline, preference
from jaxtune.data.examples import DEFAULT_TASK, ExampleBuilder, TaskSpec
from jaxtune.data.flan import FlanSpec
from jaxtune.data.tokenizers import encode_prompt, load_tokenizer, train_sentencepiece
from jaxtune.errors import UserError
from tests.helpers import WORDS

BOS, EOS = "<s>", "</s>"
# Post-processors: Llama-style (adds BOS), GPT-2-style (declares <s>, adds nothing), none, and BOS + EOS.
KINDS = {
    "adds_bos": (f"{BOS} $A", True),
    "declares_bos": ("bytelevel", True),
    "no_bos": (None, False),
    "adds_bos_eos": (f"{BOS} $A {EOS}", True),
}
THREE = ("adds_bos", "declares_bos", "no_bos")
# Completions start with a space: byte-level BPE then splits prompt + completion where jaxtune does.
PROMPT, CHOSEN, REJECTED = "the red cat sat on", " the blue moon", " a green tree"
MESSAGES = [{"role": "user", "content": "red cat"}, {"role": "assistant", "content": "blue moon"}]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("special_tokens")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS + ["the", "a", "sat", "on"], size=8)) for _ in range(300)]
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    base.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", BOS, EOS, "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    dirs = {}
    for kind, (post, declares_bos) in KINDS.items():
        tok = Tokenizer.from_str(base.to_str())
        if post == "bytelevel":
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        elif post:
            specials = [(t, tok.token_to_id(t)) for t in (BOS, EOS) if t in post]
            tok.post_processor = processors.TemplateProcessing(single=post, pair=f"{post} $B:1", special_tokens=specials)
        if kind == "adds_bos":  # settings tokenizer(text) ignores (it pads/truncates only when asked)
            tok.enable_padding(length=40, pad_id=tok.token_to_id("<pad>"), pad_token="<pad>")
            tok.enable_truncation(max_length=3)
        directory = root / kind
        directory.mkdir()
        tok.save(str(directory / "tokenizer.json"))
        config = {"eos_token": EOS, "pad_token": "<pad>", **({"bos_token": BOS} if declares_bos else {})}
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        dirs[kind] = directory
    return dirs


def from_pretrained(directory):
    """transformers' tokenizer of a directory (what AutoTokenizer gives for these; importing it skips torch)."""
    pytest.importorskip("transformers")
    from transformers.tokenization_utils_tokenizers import PreTrainedTokenizerFast
    from transformers.utils import logging

    logging.set_verbosity_error()
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def hf(tokenizer_dirs):
    return {kind: from_pretrained(d) for kind, d in tokenizer_dirs.items()}


def ids(tokenizer, text, specials=True):
    return list(tokenizer(text, add_special_tokens=specials).input_ids)


def sequence(example, row=None):
    """The token sequence an example was shifted from (inputs + the last target)."""
    if row is None:
        n = len(example["inputs"])
        return [*example["inputs"][:n].tolist(), int(example["targets"][n - 1])]
    n = int(example["segment_ids"][row].sum())
    return [*example["inputs"][row, :n].tolist(), int(example["targets"][row, n - 1])]


@pytest.mark.parametrize("kind", THREE)
def test_prompts_match_transformers(kind, tokenizer_dirs, hf, monkeypatch):
    """SFT, preference, KTO, evaluation and generate start a prompt exactly as `tokenizer(prompt)` does."""
    tok, ref = load_tokenizer(tokenizer_dirs[kind]), hf[kind]
    prompt = ids(ref, PROMPT)
    assert (prompt[0] == ref.bos_token_id) == (kind == "adds_bos")
    completion = ids(ref, CHOSEN, specials=False) + [ref.eos_token_id]

    record = {"prompt": PROMPT, "response": CHOSEN}
    task = TaskSpec(DEFAULT_TASK, [record], flan={DEFAULT_TASK: FlanSpec(((("{prompt}", "{response}")),))})
    assert sequence(ExampleBuilder(task, 0, tok, seq_len=96, seed=0)(0, record)) == prompt + completion  # SFT

    pairs = [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}]
    rows = preference.PreferenceTransform(pairs, {DEFAULT_TASK: [("{prompt}", "{response}")]}, tok, seq_len=96,
                                          truncation="error", seed=0)(0, pairs[0])
    assert sequence(rows, 0) == prompt + completion
    assert sequence(rows, 1) == prompt + ids(ref, REJECTED, specials=False) + [ref.eos_token_id]
    kto = [{"prompt": PROMPT, "completion": CHOSEN, "label": True}, {"prompt": "a", "completion": REJECTED, "label": False}]
    rows = preference.PreferenceTransform(kto, {DEFAULT_TASK: [("{prompt}", "{response}")]}, tok, seq_len=96,
                                          truncation="error", seed=0, unpaired=True)(0, kto[0])
    assert sequence(rows, 0) == prompt + completion

    seen = {}
    monkeypatch.setattr(evaluate, "score_continuations", lambda m, p, pairs, **kw: seen.setdefault("scored", pairs)
                        and (np.zeros(len(pairs)), np.ones(len(pairs)), np.zeros(len(pairs))))
    monkeypatch.setattr(generate_lib, "generate", lambda m, p, prompts, **kw: seen.setdefault("generated", []).append(prompts)
                        or [[] for _ in prompts])
    evaluate.loss_scores(None, None, tok, [{"prompt": PROMPT, "answer": CHOSEN}], seq_len=96, batch_size=1)
    assert seen["scored"] == [(prompt, completion)]
    eval_cfg = types.SimpleNamespace(max_new_tokens=4, batch_size=1, stop_strings=())
    evaluate.generate_answers(None, None, tok, [{"prompt": PROMPT}], eval_cfg)
    api.Model(None, None, tok, config_lib.base_config()).generate(PROMPT)  # `jaxtune generate` encodes the same way
    assert seen["generated"] == [[prompt], [prompt]]


def test_tokenizer_that_adds_eos(tokenizer_dirs, hf):
    """A post-processor that also ends a text with EOS: a prompt gets the BOS but no EOS (it is continued);
    a trained sequence equals `tokenizer(prompt + completion)`, which ends with that EOS."""
    tok, ref = load_tokenizer(tokenizer_dirs["adds_bos_eos"]), hf["adds_bos_eos"]
    assert ids(ref, PROMPT)[-1] == ref.eos_token_id
    assert encode_prompt(tok, PROMPT) == ids(ref, PROMPT)[:-1]
    record = {"prompt": PROMPT, "response": CHOSEN}
    task = TaskSpec(DEFAULT_TASK, [record], flan={DEFAULT_TASK: FlanSpec(((("{prompt}", "{response}")),))})
    assert sequence(ExampleBuilder(task, 0, tok, seq_len=96, seed=0)(0, record)) == ids(ref, PROMPT + CHOSEN)


@pytest.mark.parametrize("kind", THREE)
@pytest.mark.parametrize("template", ["plain", "chatml"])  # writes {{ bos_token }} / writes no BOS
def test_chat_matches_apply_chat_template(kind, template, tokenizer_dirs, hf, monkeypatch):
    """Chat examples and `generate --chat` prompts are the template's text only, as
    `apply_chat_template(tokenize=True)`: one BOS when the template writes it, none when it does not,
    whatever the tokenizer adds to plain text."""
    tok, ref = load_tokenizer(tokenizer_dirs[kind]), hf[kind]
    jinja = chat_lib.resolve_template(template)
    expected = list(ref.apply_chat_template(MESSAGES, chat_template=jinja, tokenize=True)["input_ids"])
    task = TaskSpec("chat", [{"messages": MESSAGES}], chat_template=jinja)
    assert sequence(ExampleBuilder(task, 0, tok, seq_len=96, seed=0)(0, {"messages": MESSAGES})) == expected

    pair = {"prompt": MESSAGES[:1], "chosen": [MESSAGES[1]], "rejected": [{"role": "assistant", "content": "green"}]}
    rows = preference.PreferenceTransform([pair], {DEFAULT_TASK: [("{prompt}", "{response}")]}, tok, seq_len=96,
                                          truncation="error", seed=0, chat_template=jinja)(0, pair)
    prompt = list(ref.apply_chat_template(MESSAGES[:1], chat_template=jinja, tokenize=True,
                                          add_generation_prompt=True)["input_ids"])
    assert sequence(rows, 0)[: len(prompt)] == prompt

    seen = []
    monkeypatch.setattr(generate_lib, "generate", lambda m, p, prompts, **kw: seen.extend(prompts) or [[]])
    chat_loop.chat(None, None, tok, jinja, stdin=io.StringIO(MESSAGES[0]["content"] + "\n"), stdout=io.StringIO())
    assert seen == [prompt]


def test_add_bos_override(tokenizer_dirs, hf):
    """data.add_bos=true puts BOS first (chat too, never twice); false leaves it out; auto is the tokenizer's."""
    declares = load_tokenizer(tokenizer_dirs["declares_bos"], add_bos="true")
    plain = ids(hf["declares_bos"], PROMPT, specials=False)
    assert encode_prompt(declares, PROMPT) == [declares.bos_id] + plain
    assert encode_prompt(load_tokenizer(tokenizer_dirs["adds_bos"], add_bos="false"), PROMPT) == plain
    for template in ("plain", "chatml"):  # with and without the template's own BOS
        task = TaskSpec("chat", [{"messages": MESSAGES}], chat_template=chat_lib.resolve_template(template))
        tokens = sequence(ExampleBuilder(task, 0, declares, seq_len=96, seed=0)(0, {"messages": MESSAGES}))
        assert tokens[0] == declares.bos_id and declares.bos_id not in tokens[1:]
    clone = pickle.loads(pickle.dumps(declares))  # Grain workers get the setting too
    assert clone.add_bos == "true" and encode_prompt(clone, PROMPT) == encode_prompt(declares, PROMPT)


def test_add_bos_errors(tokenizer_dirs, tmp_path):
    with pytest.raises(UserError, match="'data.add_bos' is 'true' but the tokenizer .* has no BOS"):
        load_tokenizer(tokenizer_dirs["no_bos"], add_bos="true")
    with pytest.raises(UserError, match="config key 'data.add_bos' is 'yes'; expected one of auto, true, false"):
        validation.load_config("configs/quickstart.py", ["data.add_bos=yes"])
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": "no"}')
    train_sentencepiece([" ".join(WORDS)] * 20, tmp_path / "tokenizer", vocab_size=300)
    with pytest.raises(UserError, match="tokenizer_config.json: add_bos_token must be true or false"):
        load_tokenizer(tmp_path / "tokenizer.model")


def test_sentencepiece_bos(tmp_path):
    """A bare .model keeps BOS (quickstart and the TRL-matched preference tests: ids unchanged); a
    tokenizer_config.json beside it decides with add_bos_token, as transformers reads it."""
    model = train_sentencepiece([" ".join(WORDS)] * 20, tmp_path / "tokenizer", vocab_size=300)
    bare = load_tokenizer(tmp_path / "tokenizer.model")
    assert encode_prompt(bare, PROMPT) == [bare.bos_id] + model.encode(PROMPT)  # the rule before tokenizer configs
    for add in (True, False):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                    "add_bos_token": add}))
        assert encode_prompt(load_tokenizer(tmp_path), PROMPT) == ids(from_pretrained(tmp_path), PROMPT)


def test_config_reaches_the_tokenizer(tokenizer_dirs, tmp_path):
    """data.add_bos set in a config is what the run's data (and its first example) uses."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": PROMPT, "response": CHOSEN}) + "\n")
    c = config_lib.base_config()
    c.data.train_path, c.data.tokenizer, c.data.add_bos = str(path), str(tokenizer_dirs["adds_bos"]), "false"
    data = datasets.load_sft_data(loading.data_settings(c), tmp_path, seed=0)
    example = ExampleBuilder(data.tasks[0], 0, data.tokenizer, seq_len=96, seed=0)(0, data.tasks[0].records[0])
    assert data.tokenizer.add_bos == "false" and example["inputs"][0] != data.tokenizer.bos_id
    assert pipeline.tokenize_prompts(data.tokenizer, [PROMPT]) == [encode_prompt(data.tokenizer, PROMPT)]


def test_exported_sentencepiece_model_adds_bos_as_training_did(tmp_path):
    """convert/export write a tokenizer_config.json beside a bare .model (transformers would add no
    BOS to it), so the exported tokenizer encodes prompts as the run did, data.add_bos included."""
    from jaxtune.models import hf as hf_lib

    (tmp_path / "run").mkdir()
    train_sentencepiece([" ".join(WORDS)] * 20, tmp_path / "run" / "tokenizer", vocab_size=300)
    for add_bos in ("auto", "false"):
        out = tmp_path / add_bos
        out.mkdir()
        assert hf_lib.copy_tokenizer_files(tmp_path / "run", out, add_bos=add_bos) == [
            "tokenizer.model", "tokenizer_config.json"]
        trained = load_tokenizer(tmp_path / "run" / "tokenizer.model", add_bos=add_bos)
        assert encode_prompt(trained, PROMPT) == ids(from_pretrained(out), PROMPT)
