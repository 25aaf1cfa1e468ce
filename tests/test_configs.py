"""Every shipped config (configs/*.py) loads and validates with each documented variant, and the
`jaxtune train|plan` commands in its docstring are valid (file argument and --config.KEY=VALUE keys)."""

import ast
import importlib.util
import shlex
from pathlib import Path

import pytest

from jaxtune import validation

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"jaxtune_test_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _variants() -> list[str]:
    """`configs/FILE.py:ARG` for each variant a config documents (its own tables of names)."""
    sft_llama, dpo, grpo = (_module(REPO / "configs" / f"{name}.py") for name in ("sft_llama", "dpo", "grpo"))
    specs = ["quickstart.py", "quickstart.py:steps=5", "mixture_example.py", "mixture_example.py:data/example"]
    specs += [f"sft_llama.py:{v}" for v in sft_llama._VARIANTS]
    specs += [f"sft_lora.py:{a}" for a in ("", "method=dora", "quantize=nf4", "quantize=int8", "family=qwen2",
                                           "family=gemma2,method=dora,quantize=nf4,targets=q+v", "variant=llama3.1-8b",
                                           "hf_dir=/path/to/hf_model,rank=4")]
    specs += [f"dpo.py:loss={loss}" for loss in dpo.LOSSES]
    specs += [f"dpo.py:loss={loss},variant={v},method={m}" for loss in ("sigmoid", "kto") for v in ("tiny", "llama3.2-1b")
              for m in ("none", "lora", "dora")]
    specs += [f"dpo.py:loss={loss},model=t5" for loss in dpo.LOSSES]  # an encoder-decoder (T5)
    specs += [f"reward.py:variant={v},method={m}" for v in ("tiny", "llama3.2-1b") for m in ("none", "lora", "dora")]
    specs += ["grpo.py", "grpo.py:stage=sft", "grpo.py:lora=4,hf_dir=/m", "grpo.py:steps=3,init_from=runs/x"]
    specs += [f"grpo.py:variant={v}" for v in grpo.VARIANTS]
    specs += ["online_dpo.py", "online_dpo.py:loss_type=ipo,lora=4,hf_dir=/m"]
    specs += ["ppo.py", "ppo.py:value_model=separate,lora=4", "ppo.py:variant=llama3.1-8b,lora=16,value_model=separate"]
    specs += ["flan_clusters.py", "flan_clusters.py:clusters=1,templates=1", "flan_clusters.py:clusters=3,steps=5"]
    return [f"configs/{s}" for s in specs]  # relative to the repository root, as the docstrings write them


def _docstring_commands() -> list[tuple[str, list[str]]]:
    """(config spec, overrides) of every `jaxtune train|plan --config ...` line in a config's docstring."""
    found = []
    for path in CONFIGS:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for command in doc.replace("\\\n", " ").splitlines():
            command = command.split("#")[0].strip()
            if not command.startswith(("jaxtune train ", "jaxtune plan ")):
                continue
            words = shlex.split(command)
            spec = words[words.index("--config") + 1]
            overrides = [w.removeprefix("--config.") for w in words if w.startswith("--config.")]
            found.append((spec, overrides))
    return found


def _overrides(spec: str) -> list[str]:
    """A training file for configs that read one (the data itself is not opened here)."""
    return [] if any(name in spec for name in ("quickstart", "mixture", "grpo", "online_dpo", "flan_clusters")) else ["data.train_path=x.jsonl"]


@pytest.mark.parametrize("spec", _variants())
def test_each_config_variant_loads_and_validates(spec):
    config = validation.load_config(str(REPO / spec), _overrides(spec), needs_data=False)
    assert config.train.steps > 0 and set(config.objective) == {"type", config.objective.type.replace("preference", "dpo")}


COMMANDS = _docstring_commands()


def test_every_config_documents_its_command():
    assert {spec.split(":")[0] for spec, _ in COMMANDS} == {f"configs/{p.name}" for p in CONFIGS}


@pytest.mark.parametrize("spec, overrides", COMMANDS, ids=[" ".join([s, *o]) for s, o in COMMANDS])
def test_docstring_commands_load(spec, overrides):
    if not any(o.startswith("data.train_path=") for o in overrides):
        overrides = [*overrides, *_overrides(spec)]
    validation.load_config(str(REPO / spec), overrides, needs_data=False)
