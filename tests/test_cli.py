"""The `jaxtune` command: one-line user errors with exit status 2, SIGTERM saves and resumes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jaxtune import cli
from jaxtune.metrics import read_metrics
from tests.helpers import write_config_file, write_sft_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config_file(tmp_path):
    train = write_sft_jsonl(tmp_path / "train.jsonl")
    return write_config_file(tmp_path / "cfg.py", train, "c.train.steps = 4",
                             preamble='"""jaxtune train --config cfg.py --workdir W"""')


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("jaxtune: error: ")
    return err[0]


def test_unknown_override_key(config_file, tmp_path, capsys):
    code = cli.main(["train", "--config", str(config_file), "--workdir", str(tmp_path / "w"), "--config.optim.lrr=1e-3"])
    assert code == 2
    assert "did you mean 'optim.lr'" in _error_line(capsys)


def test_missing_config_file(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")]) == 2
    assert "nope.py: no such file" in _error_line(capsys)


def test_impossible_value(config_file, tmp_path, capsys):
    assert cli.main(["train", "--config", str(config_file), "--workdir", str(tmp_path / "w"), "--config.optim.lr", "0"]) == 2
    assert "'optim.lr' must be > 0" in _error_line(capsys)


def test_batch_not_divisible_by_devices(config_file, tmp_path, capsys):
    code = cli.main(["train", "--config", str(config_file), "--workdir", str(tmp_path / "w"), "--config.train.global_batch_size=12"])
    assert code == 2
    assert "not divisible by the data-parallel size 8" in _error_line(capsys)


def test_seq_len_beyond_model(config_file, tmp_path, capsys):
    code = cli.main(["train", "--config", str(config_file), "--workdir", str(tmp_path / "w"), "--config.data.seq_len=4096"])
    assert code == 2
    assert "max_position_embeddings" in _error_line(capsys)


def test_malformed_jsonl_names_file_and_line(config_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"prompt": f"p{i}", "response": "r"}) for i in range(5)]
    lines[3] = '{"prompt": "oops"'
    bad.write_text("\n".join(lines) + "\n")
    code = cli.main(["train", "--config", str(config_file), "--workdir", str(tmp_path / "w"),
                     f"--config.data.train_path={bad}", "--config.data.shuffle=false", "--config.data.tokenizer_vocab_size=259"])
    assert code == 2
    assert "bad.jsonl:4: invalid JSON" in _error_line(capsys)


def test_template_missing_field(config_file, tmp_path, capsys):
    code = cli.main(["train", "--config", str(config_file), "--workdir", str(tmp_path / "w"),
                     "--config.data.templates=(('{question}', '{response}'),)"])
    assert code == 2
    line = _error_line(capsys)
    assert "question" in line and "prompt" in line  # the missing field and the available ones


def test_debug_shows_traceback(config_file, tmp_path):
    with pytest.raises(Exception, match="did you mean"):
        cli.main(["--debug", "train", "--config", str(config_file), "--workdir", str(tmp_path / "w"), "--config.optim.lrr=1"])


def test_sigterm_saves_and_rerun_resumes(config_file, tmp_path):
    """A real process: SIGTERM mid-run -> checkpoint + exit 0; the same command then finishes."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxtune.cli", "train", "--config", str(config_file), "--workdir", str(workdir),
           "--config.train.steps=100000", "--config.train.checkpoint_every=100000", "--config.mesh.data=-1"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "checkpoint saved" in out
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 3
    stopped_at = saved[-1]
    assert max(row["step"] for row in read_metrics(workdir) if "loss" in row) == stopped_at  # saved the current step
    # Rerun the same command with a reachable end: it resumes from the saved step.
    cmd[cmd.index("--config.train.steps=100000")] = f"--config.train.steps={stopped_at + 2}"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resuming from step {stopped_at}" in out.stdout
    steps = [row["step"] for row in read_metrics(workdir) if "loss" in row]
    assert steps == list(range(1, stopped_at + 3))


@pytest.fixture
def mixture_config_file(tmp_path):
    path = tmp_path / "mix.py"
    path.write_text(textwrap.dedent(f'''
        """jaxtune data preview --config mix.py"""
        from pathlib import Path
        from tests.helpers import tiny_mixture_config

        def get_config(arg=None):
            c = tiny_mixture_config(Path({str(tmp_path)!r}))
            c.unlock()
            return c
    '''))
    return path


def test_data_preview_shows_marked_examples_and_stats(mixture_config_file, tmp_path, capsys):
    code = cli.main(["data", "preview", "--config", str(mixture_config_file), "--num", "6", "--batches", "3",
                     "--workdir", str(tmp_path / "w"), "--config.data.tasks.nli.cap=10", "--config.data.seq_len=96"])
    assert code == 0
    out = capsys.readouterr().out
    assert "nli: 25.00% of examples (40 records)" in out and "chat: 75.00%" in out  # 10 : 30 after the override
    assert "(task chat)" in out and "⟦" in out and "<|im_end|>\n⟧" in out  # the end-of-turn token is trained
    assert "nli: " in out.split("stats over 3 batches")[1] and "length p50" in out and "packing efficiency" in out


def test_bad_task_key_and_missing_template_field(mixture_config_file, tmp_path, capsys):
    args = ["data", "preview", "--config", str(mixture_config_file), "--workdir", str(tmp_path / "w")]
    assert cli.main(args + ["--config.data.tasks.nli.few_shots=2"]) == 2
    assert "did you mean 'data.tasks.nli.few_shot'" in _error_line(capsys)
    fields = "{'premise': 's1', 'answer': 'label', 'options': 'choices'}"  # s2 no longer mapped to hypothesis
    assert cli.main(args + [f"--config.data.tasks.nli.fields={fields}"]) == 2
    line = _error_line(capsys)
    assert "task 'nli', template" in line and "uses field 'hypothesis'" in line
    assert "available fields: answer, options, options_, premise, s2" in line
