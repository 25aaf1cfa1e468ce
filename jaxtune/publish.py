"""A run's export as a Hugging Face Hub repo: the model card written next to every export, and
`--push_to_hub org/name` uploading the exported folder as it is.

The card (README.md) is built from what the run recorded, never typed by hand: the base model
and the commit it was downloaded at (workdir.HUB_COMMITS), the Hub datasets of its tasks, the
objective and its key hyperparameters, the last logged metrics and the jaxtune version, with the
Hub's metadata block (`library_name`, `base_model`, `datasets`, `tags`). The upload is
`huggingface_hub.HfApi.upload_folder` of exactly the folder written locally (one commit; token
from HF_TOKEN or the stored login), on `--revision` (a branch, created when missing).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import ml_collections

from jaxtune import distributed, hub, metrics, paths, workdir as workdir_lib
from jaxtune.errors import UserError

CARD_FILE = "README.md"
_FINAL_METRICS = ("loss", "eval/loss", "eval/perplexity", "eval/exact_match", "eval/accuracy", "reward_accuracy",
                  "rewards/accuracy", "accuracy")


def _jaxtune_version() -> str:
    try:
        return metadata.version("jaxtune")
    except metadata.PackageNotFoundError:  # a source checkout that is not installed
        return "unknown"


def _base_model(config: ml_collections.ConfigDict, workdir: str) -> tuple[str | None, str | None]:
    """(Hub repo id, commit) of the run's base model; (local path, None) for a folder; (None, None)
    for a model trained from its seed."""
    ref = config.model.get("hf_dir") or ""
    if not ref:
        return None, None
    if not hub.is_hub_id(ref):
        return ref, None
    record_file = paths.path(workdir) / workdir_lib.HUB_COMMITS
    recorded = json.loads(record_file.read_text()) if record_file.exists() else {}
    return hub.parse(ref)[0], recorded.get(ref, {}).get("commit")


def _datasets(config: ml_collections.ConfigDict) -> list[str]:
    """The Hub dataset ids the run reads: its tasks' (`task_config(source="hf", path="org/name")`)
    and its single sets' (`data.source_kind="hf"` with data.train_path / data.eval_path)."""
    tasks = config.data.get("tasks") or {}
    found = {str(t.get("path")) for t in tasks.values() if t.get("source") == "hf"}
    if config.data.get("source_kind") == "hf":
        found |= {str(config.data.get(key)) for key in ("train_path", "eval_path") if config.data.get(key)}
    return sorted(path for path in found if hub.is_hub_id(path))


def _final_metrics(workdir: str) -> dict[str, float]:
    """The last logged value of each headline metric (train and evaluation rows)."""
    try:
        rows = metrics.read_metrics(workdir)
    except FileNotFoundError:
        return {}
    last: dict[str, float] = {}
    for row in rows:
        for name in _FINAL_METRICS:
            if isinstance(row.get(name), (int, float)):
                last[name] = float(row[name])
    return last


def _hyperparameters(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
    c = config
    out: dict[str, Any] = {"objective": c.objective.type, "steps": step, "learning_rate": c.optim.lr,
                           "global_batch_size": c.train.global_batch_size, "seq_len": c.data.seq_len}
    section = c.objective.get(c.objective.type)
    for key in ("beta", "loss_type", "num_generations", "rewards"):
        if section is not None and key in section:
            value = section[key]
            out[key] = list(value) if isinstance(value, tuple) else value
    if c.peft.method != "none":
        out["peft"] = c.peft.method
        out.update({k: c.peft[k] for k in ("rank", "alpha") if k in c.peft})
    return out


def model_card(config: ml_collections.ConfigDict, workdir: str, *, kind: str, step: int) -> str:
    """The README.md of an export: `kind` is "merged", "peft" or "full" (a fully trained model)."""
    import yaml

    base, commit = _base_model(config, workdir)
    on_hub = hub.is_hub_id(config.model.get("hf_dir"))
    datasets = _datasets(config)
    meta: dict[str, Any] = {"library_name": "peft" if kind == "peft" else "transformers"}
    if on_hub:
        meta["base_model"] = base
    if datasets:
        meta["datasets"] = datasets
    meta["tags"] = ["jaxtune", config.objective.type, *([config.peft.method] if config.peft.method != "none" else [])]
    what = {"peft": "adapters (PEFT format) for", "merged": "a fine-tune of (adapters merged into the weights)",
            "full": "a fine-tune of"}[kind]
    base_line = (f"[{base}](https://huggingface.co/{base})" + (f" at commit `{commit}`" if commit else "")
                 if on_hub else f"`{base}`" if base else "a model initialised from its seed")
    lines = [f"# {Path(str(workdir)).name}", "", f"This model is {what} {base_line}, trained with "
             f"[jaxtune](https://github.com/jaxtune/jaxtune) {_jaxtune_version()}.", ""]
    if datasets:
        lines += ["Datasets: " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets), ""]
    lines += ["## Training", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {json.dumps(v) if isinstance(v, (list, dict)) else v} |"
              for k, v in _hyperparameters(config, step).items()]
    final = _final_metrics(workdir)
    if final:
        lines += ["", "## Final metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in final.items()]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(lines) + "\n"


def write_card(out_dir: str, config: ml_collections.ConfigDict, workdir: str, *, kind: str, step: int) -> None:
    """Writes the export's model card (process 0: the export folder is written once)."""
    card = model_card(config, workdir, kind=kind, step=step)
    distributed.on_first_process(lambda: (paths.path(out_dir) / CARD_FILE).write_text(card), "model_card")


def push(out_dir: str, repo_id: str, *, private: bool = False, revision: str | None = None,
         message: str = "Upload with jaxtune") -> str:
    """Uploads the export folder `out_dir` to `repo_id` (created when missing) on `revision`; the commit URL."""
    import huggingface_hub
    from huggingface_hub import errors

    if not hub.is_hub_id(repo_id) or "@" in repo_id:
        raise UserError(f"--push_to_hub {repo_id!r}: expected a Hub repo id, org/name (use --revision for a branch)")
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(out_dir), revision=revision,
                                 commit_message=message)
    except errors.LocalTokenNotFoundError:
        raise UserError(f"--push_to_hub {repo_id}: no Hugging Face token; log in with `hf auth login` or set "
                        "HF_TOKEN to a token with write access") from None
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise UserError(f"--push_to_hub {repo_id}: not allowed to write there ({status}); log in with "
                            "`hf auth login` or set HF_TOKEN to a token with write access") from None
        raise UserError(f"--push_to_hub {repo_id}: the Hub answered "
                        f"{next((s for s in str(e).splitlines() if s.strip()), type(e).__name__)}") from None
    except ValueError as e:  # a card the Hub refuses (validate-yaml), a bad folder
        raise UserError(f"--push_to_hub {repo_id}: {e}") from None
    return info.commit_url
