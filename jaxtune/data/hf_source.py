"""🤗 `datasets` as a record source: a Hub dataset id or a local dataset folder, read by random access.

`HfSource` is a Grain random-access source over a prepared `datasets.Dataset`: its rows live in
memory-mapped Arrow files, so `len` is free and `source[i]` decodes one row, never the whole set.
Grain's shuffling, per-process slices, mixtures and the checkpointed data position therefore work
exactly as for JSONL files. What `path` may be:

* a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with
  `datasets.load_from_disk`; the split, with slicing, is cut here without copying);
* any other local folder (data files such as `train.jsonl` / `test.parquet`, or a README.md whose
  `configs:` name the configs) or a Hub id `org/name`: `datasets.load_dataset(path, name,
  split=..., revision=..., data_files=...)`, which downloads (Hub) and prepares the Arrow files once
  in the `datasets` cache (`HF_DATASETS_CACHE`, under `HF_HOME`); later runs and `HF_HUB_OFFLINE=1`
  read that cache.

With several JAX processes, process 0 prepares the dataset first and the others then open it
(from the cache when it is shared, else preparing their own copy); each reads only its own slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxtune import distributed
from jaxtune.errors import UserError


def _is_saved_dataset(path: Path) -> bool:
    """A `save_to_disk` folder: a DatasetDict (dataset_dict.json) or a Dataset (state.json)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def describe(path: str, *, name: str = "", split: str = "train", revision: str = "") -> str:
    """How errors and `_where` labels name the dataset: `hf dataset 'org/x' (config 'c', split 'train[:10%]')`."""
    parts = [f"config {name!r}"] if name else []
    parts.append(f"split {split!r}")
    if revision:
        parts.append(f"revision {revision!r}")
    return f"hf dataset {path!r} ({', '.join(parts)})"


def _split_saved(saved: Any, split: str, label: str):
    """The rows `split` names (`train`, `train[:10%]`, `train[5:]+test`) of a `load_from_disk` result,
    as zero-copy slices of its Arrow tables."""
    import datasets

    try:
        instruction = datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as e:
        raise UserError(f"{label}: bad split {split!r}: {e}") from None
    if isinstance(saved, datasets.DatasetDict):
        splits = {key: len(value) for key, value in saved.items()}
        pick = lambda key: saved[key]
    else:  # a lone Dataset is the one split, whatever name the spec gives it (slicing applies)
        splits = {part.split("[")[0].strip(): len(saved) for part in split.split("+")}
        pick = lambda key: saved
    try:
        parts = instruction.to_absolute(splits)
    except (ValueError, AssertionError, KeyError) as e:
        raise UserError(f"{label}: {e}") from None
    pieces = [pick(p.splitname).select(range(p.from_, p.to)) for p in parts]
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


def load_hf_dataset(path: str, *, name: str = "", split: str = "train", revision: str = "",
                    data_files: Any = None):
    """The `datasets.Dataset` a task names (see the module docstring); every failure is a `UserError`
    naming the dataset, config and split."""
    import datasets

    label = describe(path, name=name, split=split, revision=revision)
    local = Path(path).expanduser()
    if local.is_dir() and _is_saved_dataset(local):
        if name or data_files:
            raise UserError(f"{label}: {path} is a save_to_disk folder, which has no configs or data_files; "
                            "leave 'name' and 'data_files' empty")
        try:
            saved = datasets.load_from_disk(str(local))
        except Exception as e:  # datasets raises FileNotFoundError, ValueError, ... for damaged folders
            raise UserError(f"{label}: cannot read the save_to_disk folder: {e}") from None
        return _split_saved(saved, split, label)
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise UserError(f"{label}: no such folder, and not a Hub dataset id (expected 'org/name' or a local "
                        "dataset folder: save_to_disk output or a folder of data files)")

    def load():
        try:
            dataset = datasets.load_dataset(path, name or None, split=split, revision=revision or None,
                                            data_files=_plain_data_files(data_files))
        except Exception as e:  # DatasetNotFoundError, ValueError (config/split), HTTP and file errors
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{label}: cannot open: {type(e).__name__}: {message}") from None
        if not isinstance(dataset, datasets.Dataset):
            raise UserError(f"{label}: expected one split of rows, got a {type(dataset).__name__}")
        return dataset

    # Process 0 downloads and prepares first; the others then read what it prepared (shared cache)
    # or prepare their own copy, never racing on the same files.
    first: list = []
    distributed.on_first_process(lambda: first.append(load()), f"hf-dataset:{path}:{name}:{split}:{revision}")
    return first[0] if first else load()


def _plain_data_files(data_files: Any) -> Any:
    """data_files from a config (ConfigDict, tuple) as load_dataset takes it (dict, list, str or None)."""
    if not data_files:
        return None
    if hasattr(data_files, "to_dict"):
        data_files = data_files.to_dict()
    if isinstance(data_files, dict):
        return {str(k): (v if isinstance(v, str) else list(v)) for k, v in data_files.items()}
    return data_files if isinstance(data_files, str) else list(data_files)


class HfSource:
    """Random access to one split of a 🤗 dataset: `source[i]` is row i as plain Python values plus
    `_where` ("hf dataset 'org/x' (split 'train') record i"). Picklable: Grain workers reopen the
    memory-mapped Arrow files, they do not copy the rows."""

    def __init__(self, path: str, *, name: str = "", split: str = "train", revision: str = "", data_files: Any = None):
        self.path, self.split = str(path), split or "train"
        self.label = describe(self.path, name=name, split=self.split, revision=revision)
        self.dataset = load_hf_dataset(self.path, name=name, split=self.split, revision=revision, data_files=data_files)
        if len(self.dataset) == 0:
            raise UserError(f"{self.label}: the split holds no records")

    @property
    def column_names(self) -> list[str]:
        return list(self.dataset.column_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        # Arrow rows decode to plain Python values already (str, int, float, bool, lists, dicts).
        return {**self.dataset[int(index)], "_where": f"{self.label} record {int(index)}"}

    def __repr__(self) -> str:
        return f"HfSource({self.label}, records={len(self)})"

