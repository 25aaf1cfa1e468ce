"""Hugging Face checkpoints <-> jaxtune params.

Family-specific knowledge (config.json fields, tensor names, layouts) lives in each family
module (`config_from_hf`, `config_to_hf`, `hf_param_maps`); this module holds what is shared:

* `from_pretrained(dir)` reads `config.json` + `*.safetensors` (one file, or shards with
  `model.safetensors.index.json`) and builds every param directly in its target sharding with
  `jax.make_array_from_callback`; each callback reads only the HF tensors (layers) its shard
  needs, so host memory peaks at about one tensor, not the model.
* `save_pretrained(config, params, dir)` writes `config.json` + sharded safetensors + index,
  gathering one tensor at a time to host (process 0 writes), so `transformers` loads it.

Safetensors files are read and written by this module directly (an 8-byte header length, a
JSON header, raw little-endian bytes): that handles bfloat16 through `ml_dtypes` without torch,
reads with plain `read()` (no mmap, so RSS stays at the tensors actually in use) and works on
any `etils.epath` path (local or `gs://`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import linen as nn

from jaxtune import sharding as sharding_lib
from jaxtune.errors import UserError
from jaxtune.models import hf_mapping, layers, llama, registry
from jaxtune.models.llama import LlamaConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json", "chat_template.jinja",
)

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# checkpoint torch_dtype -> default param_dtype (fp16 checkpoints train in fp32 master weights)
_PARAM_DTYPE_FROM_TORCH = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float32"}


# ------------------------------------------------------------------ legacy helpers (tests use them)


def llama_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
    return llama.config_from_hf(hf, **overrides)


def llama_params_from_hf(state_dict: Mapping[str, Any], config: LlamaConfig) -> dict:
    """jaxtune params (numpy, in config.param_dtype) from an in-memory HF Llama state dict."""
    return hf_mapping.params_from_state_dict(
        llama.hf_param_maps(config), state_dict, dtype=np.dtype(config.param_dtype),
        ignore=lambda name: name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight"),
    )


# ------------------------------------------------------------------ safetensors files


_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit


def _read_header(path: epath.Path, f) -> tuple[dict, int]:
    """The JSON header of an open .safetensors file and where its data starts, checked against the
    file's size: a truncated download or a file of another kind fails here with its name."""
    stat = path.stat()
    size = stat.length if hasattr(stat, "length") else stat.st_size  # epath or pathlib
    raw = f.read(8)
    if len(raw) < 8:
        raise UserError(f"{path}: not a safetensors file ({size} bytes; truncated or empty)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER_BYTES, size - 8):
        raise UserError(f"{path}: corrupt safetensors header (it claims {n} header bytes in a {size}-byte file; "
                        "truncated or not a safetensors file)")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (expected a JSON object)")
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, dtype, (start, end) = [int(d) for d in info["shape"]], info["dtype"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {info!r}") from None
        if dtype not in _ST_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}; "
                            f"supported: {', '.join(_ST_DTYPES)}")
        if end - start != math.prod(shape) * _ST_DTYPES[dtype].itemsize or start < 0:
            raise UserError(f"{path}: corrupt safetensors header: tensor {name!r} ({dtype} {shape}) spans bytes "
                            f"[{start}, {end})")
        if end > data_bytes:
            raise UserError(f"{path}: truncated: tensor {name!r} ends at data byte {end} but the file holds "
                            f"{data_bytes} data bytes")
    return header, 8 + n


class _SafetensorsFile:
    """Header of one .safetensors file; reads single tensors with seek + read."""

    def __init__(self, path: epath.Path):
        self.path = path
        if not path.exists():
            raise UserError(f"{path}: no such file")
        try:
            self._f = path.open("rb")
        except OSError as e:
            raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
        try:
            header, self._data_start = _read_header(path, self._f)
        except Exception:
            self._f.close()
            raise
        self.metadata = header.pop("__metadata__", None)
        self.tensors: dict[str, dict] = header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if info["dtype"] not in _ST_DTYPES:
            raise UserError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        self._f.seek(self._data_start + start)
        buf = self._f.read(end - start)
        if len(buf) < end - start:
            buf = bytearray(buf)
        while len(buf) < end - start:  # read() may return short on remote files
            data = self._f.read(end - start - len(buf))
            if not data:
                raise UserError(f"{self.path}: file ends inside tensor {name!r}")
            buf += data
        return np.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"])

    def close(self):
        self._f.close()


class _Checkpoint:
    """All safetensors files of an HF directory: tensor name -> file."""

    def __init__(self, directory: epath.Path):
        self.directory = directory
        index = directory / INDEX_FILE
        weight_map = None
        if index.exists():
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
            for tensor, name in sorted(weight_map.items()):
                if not (directory / name).exists():
                    raise UserError(f"{index}: tensor {tensor!r} is in {name}, which does not exist")
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise UserError(f"{directory}: no *.safetensors files (and no {INDEX_FILE})")
        self.files: dict[str, _SafetensorsFile] = {}
        try:
            for name in files:
                self.files[name] = _SafetensorsFile(directory / name)
        except Exception:
            self.close()
            raise
        self.where: dict[str, _SafetensorsFile] = {}
        for f in self.files.values():
            for tensor in f.tensors:
                self.where[tensor] = f
        for tensor, name in sorted((weight_map or {}).items()):
            if tensor not in self.files[name].tensors:
                self.close()
                raise UserError(f"{index}: tensor {tensor!r} is listed in {name}, but that file does not hold it")

    def close(self):
        for f in self.files.values():
            f.close()


# ------------------------------------------------------------------ loading


def read_hf_config(path: str | epath.PathLike) -> dict:
    path = epath.Path(path)
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise UserError(f"{path}: no such directory (looked for {CONFIG_FILE}); expected a Hugging Face model directory")
    if not file.exists():
        raise UserError(f"{path}: no {CONFIG_FILE}; expected a Hugging Face model directory")
    hf = _read_json(file)
    if not isinstance(hf, dict):
        raise UserError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    return hf


def _read_json(file: epath.Path) -> Any:
    """A JSON file's content; unreadable, non-UTF-8 or invalid files are a UserError naming it."""
    try:
        return json.loads(file.read_text())
    except OSError as e:
        raise UserError(f"{file}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{file}: not UTF-8 text (a binary or damaged file?)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _read_index(index: epath.Path) -> dict[str, str]:
    """`weight_map` (tensor -> file name) of a model.safetensors.index.json."""
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index}: expected an object with a \"weight_map\" of tensor name -> file name")
    return weight_map


def config_from_pretrained(path: str | epath.PathLike, **overrides: Any):
    """The jaxtune model config of an HF directory (family chosen by config.json's model_type).

    `param_dtype` defaults to the checkpoint's torch_dtype (bfloat16 stays bfloat16, else float32).
    """

    hf = read_hf_config(path)
    file = epath.Path(path) / CONFIG_FILE
    if "model_type" not in hf:
        raise UserError(f"{file}: no \"model_type\" field; cannot tell the model family")
    try:
        family = registry.family_for_hf(hf.get("model_type"))
    except UserError as e:
        raise UserError(f"{file}: {e}") from None
    if overrides.get("param_dtype") is None:
        torch_dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
        overrides["param_dtype"] = _PARAM_DTYPE_FROM_TORCH.get(torch_dtype, "float32")
    try:
        config = family.config_from_hf(hf, **overrides)
    except KeyError as e:
        raise UserError(f"{file}: missing field {e.args[0]!r} (model_type {hf['model_type']!r})") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise UserError(f"{file}: {e}") from None
        raise UserError(f"{file}: invalid value ({type(e).__name__}: {e})") from None
    config = family.config_for_checkpoint(config, checkpoint_tensor_names(epath.Path(path)))
    for field in _POSITIVE_FIELDS:
        value = getattr(config, field, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{file}: {field} is {value!r}; expected a positive integer")
    return config


_POSITIVE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")


def checkpoint_tensor_names(directory: epath.Path) -> frozenset[str]:
    """Tensor names of an HF directory's safetensors (headers only); empty when it has none (a
    config-only directory, e.g. for `jaxtune plan`)."""
    if not (directory / INDEX_FILE).exists() and not any(directory.glob("*.safetensors")):
        return frozenset()
    ckpt = _Checkpoint(directory)
    try:
        return frozenset(ckpt.where)
    finally:
        ckpt.close()


def _abstract_boxed_params(model: nn.Module):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


def _get(tree: Mapping, path: Sequence[str]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Sequence[str], value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _hf_slice_shape(m: hf_mapping.ParamMap, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that `m.to_hf` makes of one (layer's) slice of a jaxtune param."""
    one = shape[1:] if m.stacked else shape
    return tuple(jax.eval_shape(m.to_hf, jax.ShapeDtypeStruct(one, jnp.float32)).shape)


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised 64-byte-aligned array: the CPU backend adopts such buffers without a copy,
    so a shard costs its own size once (accelerators copy it to the device and free it)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def check_tensors(ckpt: _Checkpoint, config, abstract: Any | None = None) -> None:
    """Every tensor the model needs is present with the right shape and a float dtype, and none is
    left over; `abstract` is the unboxed abstract params (computed when not given)."""

    path = ckpt.directory
    if abstract is None:
        abstract = sharding_lib.unbox(_abstract_boxed_params(registry.build(config)))
    used = set()
    maps, ignored = _maps_in_checkpoint(ckpt, config)
    for m in maps:
        shape = tuple(_get(abstract, m.path).shape)
        expected = _hf_slice_shape(m, shape)
        for name in m.hf_names:
            f = ckpt.where.get(name)
            if f is None:
                raise UserError(f"{path}: checkpoint has no tensor {name!r} (needed for param {'/'.join(m.path)})")
            if f.shape(name) != expected:
                raise UserError(
                    f"{f.path}: tensor {name!r} has shape {list(f.shape(name))}, expected {list(expected)} "
                    f"for {type(config).__name__} from {path / CONFIG_FILE}"
                )
            if f.tensors[name]["dtype"] not in _FLOAT_DTYPES:
                raise UserError(f"{f.path}: tensor {name!r} has dtype {f.tensors[name]['dtype']}, expected a "
                                f"floating-point dtype ({', '.join(_FLOAT_DTYPES)})")
            used.add(name)
    if getattr(config, "tie_word_embeddings", False):
        ignored.add("lm_head.weight")
    ignored |= registry.family_of(config).hf_unused_tensors(config)
    leftover = sorted(n for n in ckpt.where if n not in used and n not in ignored and not n.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise UserError(
            f"{path}: checkpoint has {len(leftover)} tensors the model does not use, e.g. {leftover[:4]}; "
            "does config.json (layers, tied embeddings, biases) match the weights?"
        )


def _new_head(ckpt: _Checkpoint, config) -> bool:
    """True when `config` has a score head (num_labels) and the checkpoint is a causal LM without
    one: the head starts from a random init, as transformers' from_pretrained of a causal LM
    into `*ForSequenceClassification` (TRL's reward trainer) does."""
    return bool(getattr(config, "num_labels", None)) and hf_mapping.SCORE_TENSOR not in ckpt.where


def _maps_in_checkpoint(ckpt: _Checkpoint, config) -> tuple[list[hf_mapping.ParamMap], set[str]]:
    """The maps to read from `ckpt` and the tensors it may hold unused (a new head's lm_head)."""

    maps = registry.family_of(config).hf_param_maps(config)
    if not _new_head(ckpt, config):
        return maps, set()
    return [m for m in maps if m.path != hf_mapping.SCORE_PATH], {"lm_head.weight"}


def load_params(path: str | epath.PathLike, config, shardings: Any, *, head_seed: int = 0) -> dict:
    """Params of the HF checkpoint in `path`, each built directly in `shardings` (an unboxed tree
    of NamedShardings with the params' structure, e.g. `state_shardings.params`).

    Every tensor's presence and shape is checked before any device work; unused tensors are an
    error too (they would mean a config/checkpoint mismatch). A sequence-classification config
    (num_labels) on a causal-LM checkpoint gets a new score head from `head_seed` (lm_head unused).
    """

    path = epath.Path(path)
    abstract = sharding_lib.unbox(_abstract_boxed_params(registry.build(config)))
    dtype = np.dtype(jnp.dtype(config.param_dtype))
    ckpt = _Checkpoint(path)
    try:
        check_tensors(ckpt, config, abstract)
        maps, _ = _maps_in_checkpoint(ckpt, config)
        new_head = _new_head(ckpt, config)
        params: dict = {}
        for m in maps:
            shape = tuple(_get(abstract, m.path).shape)
            cache: dict[str, np.ndarray] = {}  # the last tensor read: replicated shards reuse it

            def tensor(name: str, m=m, cache=cache) -> np.ndarray:
                if name not in cache:
                    cache.clear()
                    cache[name] = m.to_jax(ckpt.where[name].read(name))
                return cache[name]

            def callback(index: tuple[slice, ...], m=m, shape=shape, tensor=tensor) -> np.ndarray:
                if not m.stacked:
                    piece = tensor(m.hf_names[0])[index]
                    out = _aligned_empty(piece.shape, dtype)
                    out[...] = piece
                    return out
                layers = range(*index[0].indices(shape[0]))
                rest = index[1:]
                out = None
                for j, i in enumerate(layers):
                    piece = tensor(m.hf_names[i])[rest]
                    if out is None:
                        out = _aligned_empty((len(layers), *piece.shape), dtype)
                    out[j] = piece
                return out

            array = jax.make_array_from_callback(shape, _get(shardings, m.path), callback)
            cache.clear()
            _set(params, m.path, array)
        if new_head:
            log.info("%s is a causal LM: the score head (%d labels) starts from a random init", path, config.num_labels)
            kernel = _get(abstract, hf_mapping.SCORE_PATH)
            init = jax.jit(lambda key: layers.default_kernel_init(key, kernel.shape, dtype),
                           out_shardings=_get(shardings, hf_mapping.SCORE_PATH))
            _set(params, hf_mapping.SCORE_PATH, init(jax.random.key(head_seed)))
        return params
    finally:
        ckpt.close()


def _default_mesh():
    n = len(jax.devices())
    return sharding_lib.build_mesh({"data": 1, "fsdp": n, "tensor": 1})


def from_pretrained(path: str | epath.PathLike, *, dtype: str | None = None, mesh=None, rules: Any = "fsdp", **overrides: Any):
    """(model, params) from a Hugging Face directory, params placed in their shardings.

    `dtype` is the param dtype (default: the checkpoint's torch_dtype, bf16 or fp32); `mesh`
    defaults to all devices on the fsdp axis; `rules` is a preset name or a rule table;
    `overrides` are model config fields (e.g. dtype="bfloat16" for compute, remat_policy).
    """

    config = config_from_pretrained(path, param_dtype=dtype, **overrides)
    model = registry.build(config)
    mesh = mesh if mesh is not None else _default_mesh()
    rule_table = sharding_lib.rules(rules) if isinstance(rules, str) else tuple(rules)
    shardings = sharding_lib.logical_shardings(_abstract_boxed_params(model), mesh, rule_table)
    return model, load_params(path, config, shardings)


# ------------------------------------------------------------------ saving


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """`"2GB"` -> 2e9 bytes (decimal units as in transformers; KiB/MiB/GiB binary)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise UserError(f"max_shard_size={size!r}: expected bytes or a size like '2GB', '500MB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, st_dtype, shape, nbytes in entries:
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: str | epath.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """One .safetensors file holding `tensors` (host arrays, written in the given order)."""
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    entries = [(name, _ST_NAMES[a.dtype], a.shape, a.nbytes) for name, a in arrays.items()]
    with epath.Path(path).open("wb") as f:
        f.write(_header(entries))
        for a in arrays.values():
            f.write(a.tobytes())


def save_pretrained(
    model_or_config, params: Mapping, out_dir: str | epath.PathLike, *, max_shard_size: int | str = "2GB",
    tokenizer_dir: str | epath.PathLike | None = None, dtype: str | None = None, add_bos: str = "auto",
) -> epath.Path:
    """Writes an HF directory `transformers` loads: config.json, safetensors (+ index), tokenizer.

    `dtype` is the saved tensor dtype (default: the config's param_dtype). Tensors are gathered
    to host one at a time; every process takes part in the gathers, process 0 writes.
    """

    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    family = registry.family_of(config)
    out = epath.Path(out_dir)
    params = params.get("params", params) if "params" in params and len(params) == 1 else params
    np_dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
    st_dtype = _ST_NAMES[np_dtype]
    limit = parse_size(max_shard_size)
    writer = jax.process_index() == 0

    # Plan: (hf name, map, layer or None, hf shape) in map order, grouped into shards by size.
    plan = []
    for m in family.hf_param_maps(config):
        shape = tuple(_get(params, m.path).shape)
        hf_shape = _hf_slice_shape(m, shape)
        for i, name in enumerate(m.hf_names):
            plan.append((name, m, i if m.stacked else None, hf_shape))
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = math.prod(item[3]) * np_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes

    if writer:
        out.mkdir(parents=True, exist_ok=True)
        hf_config = family.config_to_hf(config)
        hf_config["torch_dtype"] = np_dtype.name if np_dtype != np.dtype(ml_dtypes.bfloat16) else "bfloat16"
        (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        for stale in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
            if stale.exists():
                stale.unlink()
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = SINGLE_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(name, st_dtype, hf_shape, math.prod(hf_shape) * np_dtype.itemsize) for name, _, _, hf_shape in shard]
        f = (out / fname).open("wb") if writer else None
        try:
            if f:
                f.write(_header(entries))
            for name, m, layer, hf_shape in shard:
                value = _get(params, m.path)
                piece = value[layer] if layer is not None else value
                host = np.ascontiguousarray(m.to_hf(_to_host(piece)), dtype=np_dtype)
                assert host.shape == hf_shape, (name, host.shape, hf_shape)
                if f:
                    f.write(host.tobytes())
                weight_map[name] = fname
                total += host.nbytes
                del host, piece
        finally:
            if f:
                f.close()
    if writer:
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, out, add_bos=add_bos)
    return out


def copy_tokenizer_files(src: str | epath.PathLike, dst: str | epath.PathLike, *, add_bos: str = "auto") -> list[str]:
    """Copies the HF tokenizer files that exist in `src` (tokenizer.json, configs, ...) into `dst`.

    A bare sentencepiece `tokenizer.model` (a from-scratch run's) gets a tokenizer_config.json that
    says what training did, BOS first unless data.add_bos='false': transformers adds no BOS to a
    bare .model, so without it an exported model would see its prompts without BOS.
    """
    src, dst = epath.Path(src), epath.Path(dst)
    if not src.is_dir():
        raise UserError(f"tokenizer_dir {src} is not a directory")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            if str(src) != str(dst):
                (src / name).copy(dst / name, overwrite=True)
            copied.append(name)
    if copied == ["tokenizer.model"]:
        (dst / "tokenizer_config.json").write_text(
            json.dumps(sentencepiece_tokenizer_config(src / "tokenizer.model", add_bos=add_bos != "false"), indent=2))
        copied.append("tokenizer_config.json")
    return copied


def sentencepiece_tokenizer_config(model_path: epath.Path, *, add_bos: bool) -> dict:
    """tokenizer_config.json for a bare sentencepiece model: its special pieces, and whether BOS is added."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_path.read_bytes())
    config = {"add_bos_token": add_bos, "add_eos_token": False}
    for name, index in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
                        ("pad_token", sp.pad_id())):
        if index >= 0:
            config[name] = sp.id_to_piece(index)
    return config
