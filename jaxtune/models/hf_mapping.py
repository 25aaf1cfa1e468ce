"""How a family's params correspond to Hugging Face tensors, one tensor at a time.

Each family lists `ParamMap`s: the jaxtune param path, the HF tensor name(s) stacked along
axis 0 for scanned layers, and the layout change in both directions for *one* HF tensor.
Per-tensor maps let the loader stream a checkpoint straight into sharded device arrays (peak
host memory about one tensor) and let the exporter write shards without materialising a
state dict. Layout facts: HF Linear weights are [out, in]; jaxtune kernels are [in, out]
with head axes split out (q: [embed, heads, head_dim], o: [heads, head_dim, embed]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxtune.errors import UserError

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class ParamMap:
    path: tuple[str, ...]  # e.g. ("layers", "attn", "q_proj", "kernel")
    hf_names: tuple[str, ...]  # one name, or one per stacked layer (stacked on axis 0 in order)
    to_jax: Transform  # one HF tensor -> jaxtune layout of one (layer's) slice
    to_hf: Transform  # the inverse
    stacked: bool = False  # True: the jaxtune param is [len(hf_names), ...]


# ------------------------------------------------------------------ layout changes (pairs)


def identity() -> tuple[Transform, Transform]:
    return (lambda w: w), (lambda w: w)


def transpose() -> tuple[Transform, Transform]:
    """HF Linear [out, in] <-> kernel [in, out]."""
    return (lambda w: w.T), (lambda w: w.T)


def split_out_heads(heads: int, head_dim: int) -> tuple[Transform, Transform]:
    """q/k/v weight [heads*head_dim, in] <-> kernel [in, heads, head_dim]."""
    return (
        lambda w: w.T.reshape(w.shape[1], heads, head_dim),
        lambda k: k.reshape(k.shape[0], heads * head_dim).T,
    )


def split_in_heads(heads: int, head_dim: int) -> tuple[Transform, Transform]:
    """o weight [out, heads*head_dim] <-> kernel [heads, head_dim, out]."""
    return (
        lambda w: w.T.reshape(heads, head_dim, w.shape[0]),
        lambda k: k.reshape(heads * head_dim, k.shape[-1]).T,
    )


def split_heads_bias(heads: int, head_dim: int) -> tuple[Transform, Transform]:
    """q/k/v bias [heads*head_dim] <-> [heads, head_dim]."""
    return (lambda b: b.reshape(heads, head_dim)), (lambda b: b.reshape(heads * head_dim))


def param(path: Sequence[str], hf_name: str, transforms: tuple[Transform, Transform]) -> ParamMap:
    """An unstacked parameter (embeddings, final norm, lm_head)."""
    return ParamMap(tuple(path), (hf_name,), *transforms)


def layer_param(path: Sequence[str], hf_pattern: str, layers: Sequence[int], transforms: tuple[Transform, Transform]) -> ParamMap:
    """A scanned parameter: `hf_pattern` has `{i}`, filled with each layer index in `layers`."""
    return ParamMap(tuple(path), tuple(hf_pattern.format(i=i) for i in layers), *transforms, stacked=True)


def qk_norm_maps(num_layers: int) -> list[ParamMap]:
    """Per-head q/k RMSNorm scales (Qwen3, Gemma 3): `self_attn.{q,k}_norm.weight` in every layer."""
    return [
        layer_param(("layers", "attn", norm, "scale"), f"model.layers.{{i}}.self_attn.{norm}.weight",
                    range(num_layers), identity())
        for norm in ("q_norm", "k_norm")
    ]


# ------------------------------------------------------------------ whole state dicts


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy/jax/torch tensor without importing torch (bf16 goes via float32)."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def params_from_state_dict(
    maps: Sequence[ParamMap], state_dict: Mapping[str, Any], *, dtype: Any = np.float32,
    ignore: Callable[[str], bool] = lambda name: name.endswith("rotary_emb.inv_freq"),
) -> dict:
    """A params pytree from an in-memory HF state dict (tests, small models).

    A missing tensor, or one no map uses, is an error: either would mean a silently wrong model.
    """
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in state_dict:
            raise UserError(f"HF state dict is missing tensor {name!r}")
        used.add(name)
        return to_numpy(state_dict[name])

    params: dict = {}
    for m in maps:
        values = [m.to_jax(take(name)) for name in m.hf_names]
        value = np.stack(values) if m.stacked else values[0]
        node = params
        for key in m.path[:-1]:
            node = node.setdefault(key, {})
        node[m.path[-1]] = value.astype(dtype)
    leftover = sorted(k for k in state_dict if k not in used and not ignore(k))
    if leftover:
        raise UserError(
            f"HF state dict has {len(leftover)} tensors the model does not use, e.g. {leftover[:4]}; "
            "does the config (layers, tied embeddings, biases) match the checkpoint?"
        )
    return params


def state_dict_from_params(maps: Sequence[ParamMap], params: Mapping) -> dict[str, np.ndarray]:
    """The inverse, as numpy arrays with HF names (for export and round-trip tests)."""
    out = {}
    for m in maps:
        node = params
        for key in m.path:
            node = node[key]
        value = np.asarray(node)
        if m.stacked:
            for i, name in enumerate(m.hf_names):
                out[name] = m.to_hf(value[i])
        else:
            out[m.hf_names[0]] = m.to_hf(value)
    return out


# ------------------------------------------------------------------ sequence-classification heads
# A config with `num_labels` is HF's `*ForSequenceClassification` of its family: the same `model.*`
# tensors, no `lm_head`, a bias-free `score.weight` [num_labels, hidden], and config.json naming
# that class with `id2label` and the `pad_token_id` that picks the pooled token. The registry
# (models.FAMILIES) wraps every family's hooks with these, so no family repeats them.

SEQ_CLS_SUFFIX = "ForSequenceClassification"
SCORE_TENSOR = "score.weight"
SCORE_PATH = ("score", "kernel")
# causal-LM class -> its sequence-classification class where the name is not the plain swap.
_SEQ_CLS_CLASS = {"Gemma3ForCausalLM": "Gemma3TextForSequenceClassification"}


def head_param_maps(maps: list[ParamMap], config: Any) -> list[ParamMap]:
    """The family's maps for `config`: unchanged for a causal LM; with `num_labels`, lm_head
    swapped for the score head (HF [num_labels, hidden] <-> kernel [hidden, num_labels])."""
    if not getattr(config, "num_labels", None):
        return maps
    return [m for m in maps if m.path != ("lm_head", "kernel")] + [param(SCORE_PATH, SCORE_TENSOR, transpose())]


def seq_cls_class(causal_lm_class: str) -> str:
    """transformers' sequence-classification class of a family (e.g. LlamaForSequenceClassification)."""
    return _SEQ_CLS_CLASS.get(causal_lm_class, causal_lm_class.removesuffix("ForCausalLM") + SEQ_CLS_SUFFIX)


def head_config_to_hf(hf: dict[str, Any], config: Any) -> dict[str, Any]:
    """config.json of a causal LM turned into its family's sequence classifier when `num_labels` is set."""
    n = getattr(config, "num_labels", None)
    if not n:
        return hf
    hf = dict(hf, architectures=[seq_cls_class(hf["architectures"][0])], pad_token_id=config.pad_token_id)
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(n)}
    return hf


def head_fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """num_labels / pad_token_id of a sequence-classification config.json ({} for a causal LM)."""
    if not any(str(a).endswith(SEQ_CLS_SUFFIX) for a in hf.get("architectures") or ()):
        return {}
    n = hf.get("num_labels") or len(hf.get("id2label") or {"0": "LABEL_0"})
    return {"num_labels": int(n), "pad_token_id": hf.get("pad_token_id")}
