"""Tokenizers behind one small interface.

The pipeline only needs ``encode`` / ``decode`` and the special ids, so any tokenizer
format (SentencePiece ``.model``, Hugging Face ``tokenizer.json``) plugs in by implementing
:class:`Tokenizer` and registering a loader in ``_LOADERS``.

Whether a sequence starts with BOS is the tokenizer's own decision, as in `transformers`
(``tokenizer(text)``): a ``tokenizer.json``'s post-processor, a SentencePiece model's
``add_bos_token`` in the ``tokenizer_config.json`` beside it. ``data.add_bos`` overrides it.
:func:`sequence_prefix` is the one place that decides; every encoder of prompts calls it.
"""

from __future__ import annotations

import io
import json
import logging
import re
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm
from etils import epath

from jaxtune.errors import UserError

# Ids fixed by `train_sentencepiece`; pretrained models keep their own.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

# data.add_bos: "auto" follows the tokenizer; "true"/"false" force BOS on/off.
ADD_BOS_CHOICES = ("auto", "true", "false")

# Trained on at most this many sentences (a uniform sample beyond it): keeps training
# to about a second however long the corpus iterator is.
_MAX_TRAIN_SENTENCES = 200_000


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    # Ids the tokenizer's own configuration puts before a text (``tokenizer(text)`` in transformers):
    # (bos_id,) for most, () for tokenizers that declare a BOS but do not add it, or have none.
    text_prefix: tuple[int, ...]
    add_bos: str  # data.add_bos: auto | true | false (see sequence_prefix)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS (the pipeline adds those)."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``, skipping special and padding tokens."""
        ...


class SentencePieceTokenizer:
    """A SentencePiece model.

    Holds the serialized model proto rather than a file path, so it pickles into Grain
    worker processes and does not depend on the file after loading.
    """

    def __init__(self, model_proto: bytes, *, source: str = "<bytes>", add_bos_token: bool | None = None):
        self._proto = bytes(model_proto)
        self._source = source
        self._add_bos_token = add_bos_token  # tokenizer_config.json's, when one sits beside the model
        self.add_bos = "auto"
        self._build()

    def _build(self) -> None:
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(self._proto)
        self._sp = sp
        self.vocab_size: int = sp.get_piece_size()
        if sp.eos_id() < 0:
            raise UserError(f"SentencePiece model {self._source} has no EOS piece; jaxtune needs one to end targets")
        self.eos_id: int = sp.eos_id()
        self.bos_id: int | None = sp.bos_id() if sp.bos_id() >= 0 else None
        # Many pretrained models (e.g. Llama) define no pad piece. Padding positions are
        # masked out by segment_ids, so any valid id does as filler: reuse EOS.
        self.pad_id: int = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id
        # Piece strings of the special ids: chat templates write them as text (see encode_with_specials).
        self.bos_token: str | None = sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token: str = sp.id_to_piece(self.eos_id)
        self.chat_template: str | None = None
        # SentencePiece itself adds nothing unless asked; a tokenizer_config.json's add_bos_token asks
        # (as transformers reads it). Without one, a model with a BOS piece gets it, as jaxtune always
        # did and as the Llama/Gemma SentencePiece tokenizers of transformers 4 default to.
        adds = self._add_bos_token if self._add_bos_token is not None else True
        self.text_prefix: tuple[int, ...] = (self.bos_id,) if adds and self.bos_id is not None else ()
        skip = np.zeros(self.vocab_size, dtype=bool)
        skip[[i for i in range(self.vocab_size) if sp.is_control(i)]] = True
        skip[self.pad_id] = True
        self._skip = skip

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        path = epath.Path(path)
        proto = path.read_bytes()
        add_bos_token = _read_config(path.parent / "tokenizer_config.json").get("add_bos_token")
        if add_bos_token is not None and not isinstance(add_bos_token, bool):
            raise UserError(f"{path.parent / 'tokenizer_config.json'}: add_bos_token must be true or false, "
                            f"found {add_bos_token!r}")
        try:
            return cls(proto, source=str(path), add_bos_token=add_bos_token)
        except (RuntimeError, OSError) as e:
            raise UserError(f"{path} is not a valid SentencePiece model: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        # Ids past the vocab come from padded embedding rows of a model; they carry no text.
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        ids = ids[~self._skip[ids]]
        return self._sp.decode(ids.tolist())

    def id_to_piece(self, i: int) -> str:
        """The piece string of id ``i`` (for debugging tokenization)."""
        return self._sp.id_to_piece(int(i))

    def __getstate__(self) -> dict:
        return {"model_proto": self._proto, "source": self._source, "add_bos_token": self._add_bos_token,
                "add_bos": self.add_bos}

    def __setstate__(self, state: dict) -> None:
        self._proto = state["model_proto"]
        self._source = state["source"]
        self._add_bos_token = state.get("add_bos_token")
        self.add_bos = state.get("add_bos", "auto")
        self._build()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self._source}, vocab_size={self.vocab_size})"


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | os.PathLike,
    *,
    vocab_size: int = 512,
    model_type: str = "unigram",
    split_digits: bool = True,
    byte_fallback: bool = True,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece model in-process and writes ``<model_prefix>.model``.

    Text is kept verbatim (identity normalization, whitespace and newlines preserved), so
    with ``byte_fallback`` ``decode(encode(t)) == t`` for any text: templates keep their
    layout. Ids are fixed: pad=0, eos=1, bos=2, unk=3. Same texts and seed give the same
    model. Note that ``seed`` sets SentencePiece's process-wide random seed.
    """
    prefix = epath.Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # Empty lines add nothing to training.
    sentences = [t for t in texts if t and not t.isspace()]
    try:
        model = _train_spm(sentences, vocab_size, model_type, split_digits, byte_fallback, seed)
    except RuntimeError as e:
        # A small corpus supports fewer pieces than asked for; sentencepiece says how many.
        limit = re.search(r"<= (\d+)", str(e))
        if not limit:
            raise UserError(
                f"training a {model_type} SentencePiece model with vocab_size={vocab_size} for {prefix} failed: {e}"
            ) from None
        logging.getLogger(__name__).warning(
            "the tokenizer corpus supports at most %s pieces; training %s instead of %d", limit[1], limit[1], vocab_size
        )
        model = _train_spm(sentences, int(limit[1]), model_type, split_digits, byte_fallback, seed)
    path = prefix.with_name(prefix.name + ".model")
    path.write_bytes(model)
    return SentencePieceTokenizer(model, source=str(path))


def _train_spm(sentences: list[str], vocab_size: int, model_type: str, split_digits: bool, byte_fallback: bool, seed: int) -> bytes:
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        split_digits=split_digits,
        byte_fallback=byte_fallback,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        # Rare characters cost a piece each; with byte fallback they stay lossless.
        character_coverage=0.9995 if byte_fallback else 1.0,
        input_sentence_size=_MAX_TRAIN_SENTENCES,
        shuffle_input_sentence=True,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        pad_piece="<pad>",
        eos_piece="</s>",
        bos_piece="<s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    return model.getvalue()


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), with special ids from the
    directory's ``tokenizer_config.json`` / ``special_tokens_map.json``.

    Holds the JSON text, so it pickles into Grain workers. Encodes without special tokens (the
    pipeline adds BOS/EOS) and decodes skipping special and padding tokens. What the post-processor
    puts before a text (``text_prefix``) is read off it: that alone decides BOS, as in transformers 5
    (which ignores ``add_bos_token`` in tokenizer_config.json when a tokenizer.json exists).
    """

    def __init__(self, tokenizer_json: str, special_tokens: dict[str, str | None] | None = None, *, source: str = "<json>",
                 chat_template: str | None = None):
        self._json = tokenizer_json
        self._special = dict(special_tokens or {})
        self._source = source
        self.chat_template = chat_template  # the jinja chat_template of tokenizer_config.json, if any
        self.add_bos = "auto"
        self._build()

    def _build(self) -> None:
        from tokenizers import Tokenizer as _HFTok

        tok = _HFTok.from_str(self._json)
        # jaxtune truncates and pads itself (transformers' tokenizer(text) does neither by default either).
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)

        def token_id(role: str) -> int | None:
            token = self._special.get(role)
            if token is None:
                return None
            i = tok.token_to_id(token)
            if i is None:
                raise UserError(f"tokenizer {self._source}: {role} {token!r} is not in the vocabulary")
            return i

        eos = token_id("eos_token")
        if eos is None:
            raise UserError(
                f"tokenizer {self._source} defines no eos_token (tokenizer_config.json / special_tokens_map.json); "
                "jaxtune needs one to end targets"
            )
        self.eos_id: int = eos
        self.bos_id: int | None = token_id("bos_token")
        self.eos_token: str = self._special["eos_token"]
        self.bos_token: str | None = self._special.get("bos_token") if self.bos_id is not None else None
        self.text_prefix: tuple[int, ...] = _post_processor_prefix(tok)
        if self.bos_id is None and len(self.text_prefix) == 1:
            self.bos_id = self.text_prefix[0]  # the post-processor's start token is the BOS when none is declared
        pad = token_id("pad_token")
        self.pad_id: int = pad if pad is not None else eos
        special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        special.update(t for t in self._special.values() if t)
        skip = np.zeros(self.vocab_size, dtype=bool)
        for t in special:
            i = tok.token_to_id(t)
            if i is not None and i < self.vocab_size:
                skip[i] = True
        skip[self.pad_id] = True
        self._skip = skip

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> HFTokenizer:
        """Reads ``tokenizer.json`` and the special tokens of a Hugging Face tokenizer directory."""
        directory = epath.Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"{directory}: no tokenizer.json")
        special: dict[str, str | None] = {}
        chat_template = None
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            path = directory / name
            data = _read_config(path)
            for role in ("bos_token", "eos_token", "pad_token"):
                value = data.get(role)
                if isinstance(value, dict):
                    value = value.get("content")
                if value:
                    special[role] = value
            if isinstance(data.get("chat_template"), (str, list)):
                from jaxtune.data.chat import chat_template_from_config

                chat_template = chat_template_from_config(path)
        try:
            return cls(file.read_text(), special, source=str(directory), chat_template=chat_template)
        except Exception as e:  # tokenizers raises plain Exceptions on bad JSON
            if isinstance(e, UserError):
                raise
            raise UserError(f"{file} is not a valid Hugging Face tokenizer.json: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        ids = ids[~self._skip[ids]]
        return self._tok.decode(ids.tolist(), skip_special_tokens=True)

    def __getstate__(self) -> dict:
        return {"tokenizer_json": self._json, "special": self._special, "source": self._source,
                "chat_template": self.chat_template, "add_bos": self.add_bos}

    def __setstate__(self, state: dict) -> None:
        self._json, self._special, self._source = state["tokenizer_json"], state["special"], state["source"]
        self.chat_template = state.get("chat_template")
        self.add_bos = state.get("add_bos", "auto")
        self._build()

    def __repr__(self) -> str:
        return f"HFTokenizer({self._source}, vocab_size={self.vocab_size})"


def _read_config(path: epath.Path) -> dict:
    """A tokenizer_config.json / special_tokens_map.json as a dict ({} when the file is absent)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# Encoded to see what a tokenizer.json's post-processor adds around a text.
_PROBE = "Hello world 0"


def _post_processor_prefix(tok) -> tuple[int, ...]:
    """The ids a ``tokenizers`` post-processor puts before a text (TemplateProcessing's ``<s> $A``, ...)."""
    encoding = tok.encode(_PROBE, add_special_tokens=True)
    if len(encoding.ids) == len(tok.encode(_PROBE, add_special_tokens=False).ids):
        return ()  # no post-processor, or one that adds nothing (ByteLevel, ...)
    first_text = next((i for i, special in enumerate(encoding.special_tokens_mask) if not special), 0)
    return tuple(encoding.ids[:first_text])


def _load_tokenizer_json(path: epath.Path) -> Tokenizer:
    return HFTokenizer.from_dir(path.parent)


# File suffix -> (kind, loader). Hugging Face `tokenizer.json` joins here.
_LOADERS: dict[str, tuple[str, Callable[[epath.Path], Tokenizer]]] = {
    ".model": ("SentencePiece model", SentencePieceTokenizer.from_file),
    ".json": ("Hugging Face tokenizer.json", _load_tokenizer_json),
}


def load_tokenizer(path: str | os.PathLike, *, add_bos: str = "auto") -> Tokenizer:
    """Loads a tokenizer, choosing the implementation from the file type.

    A directory (e.g. a Hugging Face model dir) means its ``tokenizer.json``, else its
    ``tokenizer.model``. ``add_bos`` is ``data.add_bos`` (see :func:`sequence_prefix`).
    """
    path = epath.Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name, add_bos=add_bos)
        raise UserError(f"tokenizer directory {str(path)!r} has neither tokenizer.json nor tokenizer.model")
    if path.suffix not in _LOADERS:
        kinds = ", ".join(f"{kind} ('*{suffix}')" for suffix, (kind, _) in _LOADERS.items())
        raise UserError(f"cannot load tokenizer {str(path)!r}: unsupported file type; supported: {kinds}")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    _, loader = _LOADERS[path.suffix]
    return set_add_bos(loader(path), add_bos)


def set_add_bos(tokenizer: Tokenizer, add_bos: str) -> Tokenizer:
    """Applies ``data.add_bos`` (auto | true | false) to a loaded tokenizer; returns it."""
    if add_bos not in ADD_BOS_CHOICES:
        raise UserError(f"config key 'data.add_bos' is {add_bos!r}; expected one of {', '.join(ADD_BOS_CHOICES)}")
    if add_bos == "true" and tokenizer.bos_id is None:
        raise UserError(f"config key 'data.add_bos' is 'true' but the tokenizer {tokenizer!r} has no BOS token "
                        "(declare bos_token in its tokenizer_config.json, or use data.add_bos='auto')")
    tokenizer.add_bos = add_bos
    return tokenizer


def sequence_prefix(tokenizer: Tokenizer, *, chat: bool = False) -> tuple[int, ...]:
    """The ids jaxtune puts before a sequence's text (before a prompt: SFT, preference, eval, generate).

    ``data.add_bos='auto'``: what the tokenizer puts before a text (``tokenizer(text)`` in transformers),
    and nothing before a rendered chat template, whose text writes its own BOS when it wants one
    (``apply_chat_template(tokenize=True)`` adds no special tokens). ``'true'``: BOS, chat included;
    ``'false'``: nothing (a chat template's ``{{ bos_token }}`` stays, it is the template's text).
    """
    setting = getattr(tokenizer, "add_bos", "auto")
    if setting == "true":
        return (tokenizer.bos_id,)
    if setting == "false" or chat:
        return ()
    default = (tokenizer.bos_id,) if tokenizer.bos_id is not None else ()  # duck-typed tokenizers (tests)
    return tuple(getattr(tokenizer, "text_prefix", default))


def start_sequence(tokenizer: Tokenizer, ids: Sequence[int], *, chat: bool = False) -> list[int]:
    """``ids`` (a text's tokens) with :func:`sequence_prefix` before them, unless the text already starts with it."""
    prefix = list(sequence_prefix(tokenizer, chat=chat))
    ids = list(ids)
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A prompt's ids as a sequence starts: BOS when the tokenizer adds one (or data.add_bos says so), then
    the text. Never an EOS: a prompt is continued (the EOS comes after a trained completion)."""
    return start_sequence(tokenizer, tokenizer.encode(prompt))


def encode_with_specials(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of text that spells the BOS/EOS tokens (rendered chat templates), as their ids.

    Hugging Face tokenizers match their special tokens in text already; SentencePiece never
    produces control ids from text, so the spelled-out tokens are split off here.
    """
    specials = {t: i for t, i in ((getattr(tokenizer, "bos_token", None), tokenizer.bos_id),
                                  (getattr(tokenizer, "eos_token", None), tokenizer.eos_id)) if t and i is not None}
    if not specials:
        return tokenizer.encode(text)
    pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")
    ids: list[int] = []
    for piece in pattern.split(text):
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids.extend(tokenizer.encode(piece))
    return ids
