"""scripts/flan_effect.py, scripts/tulu_pipeline.py and scripts/rlhf_efficacy.py end to end on --tiny budgets: the mechanics
(every stage runs, the table/figure/pairs are written, a rerun resumes), not the gains, which are
measured in docs/guides/effects.md. Run as a user runs them: a subprocess on one CPU device."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(script, *args, timeout=600):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_flan_effect_tiny(tmp_path):
    result = run("flan_effect.py", "--tiny", "--workdir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted((r["setting"], r["k"]) for r in rows) == [("many", 1), ("one", 1)]
    for r in rows:
        assert 0.0 <= r["heldout_clusters"] <= 1.0 and 0.0 <= r["heldout_phrasings"] <= 1.0 and r["steps"] == 2
        assert r["wall_s"] > 0 and r["cpu_s"] > 0  # CPU seconds: the load-independent time
    assert "| many | 1 | 1 |" in result.stdout and "| one | 1 | 1 |" in result.stdout
    assert "| wall s/run | CPU s/run |" in result.stdout and "s CPU" in result.stdout
    assert (tmp_path / "flan_effect.png").read_bytes().startswith(b"\x89PNG")
    again = run("flan_effect.py", "--tiny", "--workdir", tmp_path)  # resumes: every run is in results.jsonl
    assert again.returncode == 0 and "jaxtune: done" not in again.stdout + again.stderr
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2


def test_tulu_pipeline_tiny(tmp_path):
    result = run("tulu_pipeline.py", "--tiny", "--workdir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[2:]] == ["SFT", "DPO", "GRPO"]
    assert "| wall s | CPU s |" in table[0] and "this invocation" in result.stdout
    pairs = [json.loads(line) for line in next(tmp_path.glob("seed0/pairs_*.jsonl")).read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] and p["prompt"] for p in pairs)
    summary = json.loads(next(tmp_path.glob("seed0/dpo_*/pipeline.json")).read_text())
    assert set(summary["scores"]) == {"SFT", "DPO", "GRPO"} and summary["args"]["seed"] == 0
    assert {"greedy/accuracy", "sampled/accuracy", "greedy/reward", "sampled/reward"} <= set(summary["scores"]["DPO"])
    assert set(summary["times_s"]) >= {"SFT"}
    for t in [*summary["times_s"].values(), summary["invocation_s"]]:
        assert t["wall_s"] > 0 and t["cpu_s"] > 0
    cached = json.loads(next(tmp_path.glob("seed0/sft/heldout_step*.json")).read_text())  # a DPO sweep reuses it
    assert cached == summary["scores"]["SFT"]


@pytest.mark.slow  # nine stages, each its own compiles: ~80 CPU s even with a 1-layer model
def test_rlhf_efficacy_tiny(tmp_path):
    result = run("rlhf_efficacy.py", "--tiny", "--workdir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[2:5]] == ["SFT", "PPO", "RLOO"]
    for name in ("train", "heldout"):  # verifier-labelled pairs, held out by prompt
        pairs = [json.loads(line) for line in (tmp_path / f"pairs_{name}.jsonl").read_text().splitlines()]
        assert pairs and all(p["chosen"] != p["rejected"] and p["prompt"].endswith(" A:") for p in pairs)
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= results["reward_model"]["accuracy"] <= 1.0 and results["reward_model"]["pairs"] >= 1
    heldout = results["heldout"]
    for policy in ("SFT", "PPO", "RLOO"):
        for mode in ("greedy", "sampled"):
            assert 0.0 <= heldout[f"{policy}/{mode}/worked_solution"]["mean"] <= 1.0
            assert heldout[f"{policy}/{mode}/learned_reward"]["n"] == 4
    assert "change_se" in heldout["PPO/greedy/math"] and "change" not in heldout["SFT/greedy/math"]
    assert {"SFT", "pairs", "reward model"} <= set(results["times"])
    assert all(t["cpu_s"] > 0 and t["wall_s"] > 0 for t in results["times"].values())


def _script(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # as `python scripts/NAME` runs: its siblings import
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, args, message", [
    ("flan_effect.py", ["--clusters", "0,7"], "--clusters: each K must be in 1..6"),
    ("flan_effect.py", ["--clusters", "one"], "--clusters must be comma-separated integers"),
    ("flan_effect.py", ["--templates", "few"], "--templates must list some of many, one"),
    ("tulu_pipeline.py", ["--samples", "1"], "--samples must be >= 2"),
    ("tulu_pipeline.py", ["--dpo-beta", "0"], "--dpo-beta and --dpo-lr must be > 0"),
    ("tulu_pipeline.py", ["--dpo-steps", "0"], "--dpo-steps must be >= 1"),
    ("rlhf_efficacy.py", ["--samples", "1"], "--samples must be >= 2"),
    ("rlhf_efficacy.py", ["--ppo-rollouts", "0"], "--ppo-rollouts must be >= 1"),
    ("rlhf_efficacy.py", ["--heldout-pair-share", "1"], "--heldout-pair-share must be in (0, 1)"),
    ("rlhf_efficacy.py", ["--ppo-kl", "-1"], "--ppo-kl and --rloo-kl >= 0"),
    ("rlhf_efficacy.py", ["--only", "DPO"], "--only must list PPO and/or RLOO"),
    ("tulu_pipeline.py", ["--seed", "-1"], "--seed must be >= 0"),
])
def test_argument_errors(capsys, monkeypatch, script, args, message):
    with pytest.raises(SystemExit) as e:
        _script(script, monkeypatch).parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_tulu_seed_reaches_every_stage(monkeypatch, tmp_path):
    """--seed N seeds every stage's config (SFT, sampling the pairs, DPO, GRPO all build on `common`)
    and keeps its outputs apart, so seeds can be run into one WORKDIR."""
    tulu = _script("tulu_pipeline.py", monkeypatch)
    args = tulu.parse_args(["--seed", "3", "--workdir", str(tmp_path)])
    assert tulu.seed_dir(args) == tmp_path / "seed3"
    assert tulu.grpo_config(args, tmp_path / "sft").seed == 3
    assert tulu.dpo_config(args, tmp_path / "sft", tmp_path / "pairs.jsonl").seed == 3
