"""One uninterrupted tiny run shared by the fault tests (kill, damaged checkpoint), so the default
suite pays for its compile once: 6 steps, checkpoints at 1 (orbax saves the first step), 2, 4, 6.

The fixture is registered in tests/conftest.py.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from jaxtune import cli
from tests.helpers import write_preference_jsonl, write_sft_jsonl

STEPS = 6

RUNS = {
    "sft": "",
    "lora": "c.peft.method = 'lora'",
    "dpo": textwrap.dedent('''
        c.objective.type = 'preference'
        c.objective.dpo = dict(reference='copy')  # type 'preference': the old spelling of dpo
        c.data.train_path = PAIRS
        c.data.templates = (('{prompt}', '{response}'),)
        c.optim.lr = 1e-3
    '''),
}


def write_config(directory: Path, run: str = "sft") -> Path:
    """A tiny config file for an SFT, LoRA or DPO run of STEPS steps with checkpoints every 2."""
    train = write_sft_jsonl(directory / "train.jsonl")
    pairs = write_preference_jsonl(directory / "pairs.jsonl", 48)
    path = directory / f"cfg_{run}.py"
    path.write_text(textwrap.dedent(f'''
        from tests.helpers import tiny_base_config
        PAIRS = {str(pairs)!r}

        def get_config(arg=None):
            c = tiny_base_config({str(train)!r})
            c.train.steps = {STEPS}
            c.train.checkpoint_every = 2
            c.train.keep_checkpoints = 10
    ''') + textwrap.indent(RUNS[run], " " * 4) + "\n    return c\n")
    return path


def train_argv(config: Path, workdir: Path) -> list[str]:
    return ["train", "--config", str(config), "--workdir", str(workdir)]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, workdir) of the finished uninterrupted SFT run. Tests copy the workdir before changing it."""
    root = tmp_path_factory.mktemp("reference_run")
    config = write_config(root)
    workdir = root / "run"
    assert cli.main(train_argv(config, workdir)) == 0
    return config, workdir
