"""Multi-process runs on one machine: 2 CPU processes x 2 devices (gloo collectives) against 1 process x 4.

Every process is a real `python -m jaxtune.cli` subprocess started with --coordinator_address on a
free local port, exactly as on a pod (one process per host). The single-process reference runs in
this process on 4 of its 8 fake devices, with the same config: the losses must agree per step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import pytest

from jaxtune import cli
from jaxtune import trainer, validation
from jaxtune.metrics import read_metrics
from tests.helpers import write_config_file, write_preference_jsonl, write_sft_jsonl

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
PROCESS_TIMEOUT_S = 300


def _free_port() -> int:
    """A free port for the coordinator, below the kernel's ephemeral range and in a block of its own
    per pytest-xdist worker. A port the kernel hands out (bind to 0) is released again and is only
    bound by the coordinator seconds later, after its process has imported JAX; meanwhile the
    gloo/gRPC sockets of the multi-host test running on the other worker draw from that same
    ephemeral range and can take it. Ports below the range are never handed out that way."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").exists() else 32768
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    block = max(1024, low - 10_000) + (worker * 500) % 9_000  # 500 ports per worker below the range
    for port in random.sample(range(block, min(block + 500, low)), k=min(500, low - block)):
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {block}..{block + 499}")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")


class Output(str):
    """One process's stdout followed by its stderr (what the `in` checks search), with `.stdout`
    alone: a command's own output, free of the runtime's log lines (gloo, XLA, gRPC), which
    vary with timing and load."""

    stdout: str

    def __new__(cls, stdout: str, stderr: str):
        self = super().__new__(cls, stdout + stderr)
        self.stdout = stdout
        return self


def launch(args: list[str], num_processes: int = 2, only: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
    """`jaxtune ARGS` as `num_processes` cooperating processes; `only[i]` replaces process i's ARGS.
    Output goes to files, not pipes: a pipe nobody reads yet (`wait` used to read one process at a
    time) blocks its writer once full, and the others then wait for it in a collective."""
    port = _free_port()
    procs = []
    for i in range(num_processes):
        stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxtune.cli", *(only or {}).get(i, args), "--coordinator_address",
             f"localhost:{port}", "--num_processes", str(num_processes), "--process_id", str(i)],
            env=_env(), stdout=stdout, stderr=stderr, text=True, start_new_session=True,
        )
        proc.output_files = (stdout, stderr)
        procs.append(proc)
    return procs


def wait(procs: list[subprocess.Popen], timeout: float = PROCESS_TIMEOUT_S) -> tuple[list[int], list[Output]]:
    deadline = time.time() + timeout
    try:
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outs = []
    for p in procs:
        texts = []
        for f in p.output_files:
            f.seek(0)
            texts.append(f.read())
            f.close()
        outs.append(Output(*texts))
    return [p.returncode for p in procs], outs


def run_cli(args: list[str], num_processes: int = 2) -> list[Output]:
    codes, outs = wait(launch(args, num_processes))
    assert codes == [0] * num_processes, "\n\n".join(outs)
    return outs


def _config_file(tmp_path: Path) -> Path:
    """A tiny packed-SFT config on a 2 (data) x 2 (fsdp) mesh with 2 data shards (so the same
    packed batches for 1 or 2 processes), synchronous checkpoints every 2 steps."""
    train = write_sft_jsonl(tmp_path / "train.jsonl")
    evals = write_sft_jsonl(tmp_path / "eval.jsonl", n=6)
    settings = f"""
        c.mesh.rules = "fsdp"
        c.mesh.data = 2
        c.mesh.fsdp = 2
        c.data.shards = 2
        c.data.eval_path = {str(evals)!r}
        c.eval.batch_size = 4
        c.eval.max_new_tokens = 4
        c.eval.show_examples = 0
        c.train.steps = 4
        c.train.checkpoint_every = 2
        c.train.async_checkpoints = False
    """
    return write_config_file(tmp_path / "cfg.py", train, settings,
                             preamble='"""jaxtune train --config cfg.py --workdir W"""')


DPO_OVERRIDES = [
    "data.seq_len=24", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
    "data.tokenizer_vocab_size=280", "train.steps=4", "train.global_batch_size=8", "train.log_every=1",
    "train.checkpoint_every=2", "train.async_checkpoints=False", "train.progress_bar=False", "optim.lr=1e-3",
    "optim.warmup_steps=0", "mesh.rules=fsdp", "mesh.data=2", "mesh.fsdp=2",
]


def _reference_run(config_spec: str, workdir: Path, overrides=()):
    """The same config in this process, on 4 devices."""
    config = validation.load_config(config_spec, list(overrides))
    return trainer.train(config, workdir, devices=jax.devices()[:4])


def _train_args(config_spec: str, workdir: Path, overrides=()) -> list[str]:
    return ["train", "--config", config_spec, "--workdir", str(workdir), *(f"--config.{o}" for o in overrides)]


def _losses(workdir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(workdir) if "loss" in row}


def _assert_same_losses(workdir: Path, reference: Path) -> None:
    got, want = _losses(workdir), _losses(reference)
    assert sorted(got) == sorted(want) and want, (got, want)
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= TOLERANCE, (got, want)


def _compare(tmp_path: Path, config_spec: str, overrides=()) -> list[str]:
    """2 processes x 2 devices vs 1 process x 4 devices: the same loss at every step."""
    outs = run_cli(_train_args(config_spec, tmp_path / "multi", overrides))
    _reference_run(config_spec, tmp_path / "single", overrides)
    _assert_same_losses(tmp_path / "multi", tmp_path / "single")
    return outs


def test_two_processes_match_one_packed_sft(tmp_path):
    """The default-suite representative: packed SFT on a data x fsdp mesh spanning 2 processes; the
    tokenizer is trained once, one process writes metrics and console output, checkpoints are
    multi-host saves. (No eval set, to keep it short: the LoRA test evaluates across processes.)"""
    outs = _compare(tmp_path, str(_config_file(tmp_path)), ["data.eval_path="])
    assert "jaxtune: done: 4 steps" in outs[0]
    assert "jaxtune: done" not in outs[1] and "step 4:" not in outs[1]  # process 1's stdout is quiet
    assert sorted(int(p.name) for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


@pytest.mark.slow
def test_two_processes_read_a_dataset_folder_prepared_once(tmp_path):
    """data.source_kind='hf' on a folder of data files: process 0 prepares the Arrow files into the
    (shared) datasets cache first, each process then reads its own shard: the same losses as 1 process."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    write_sft_jsonl(folder / "train.jsonl")
    _compare(tmp_path, str(_config_file(tmp_path)),
             ["data.eval_path=", "data.source_kind=hf", f"data.train_path={folder}", "data.split=train[:48]"])


@pytest.mark.slow
def test_two_processes_match_one_lora(tmp_path):
    """LoRA (adapters-only checkpoints, the base re-created), with the held-out eval (exact match by
    KV-cache generation, loss) run across processes before and after training."""
    outs = _compare(tmp_path, str(_config_file(tmp_path)), ["peft.method=lora", "peft.rank=4", "optim.lr=1e-2"])
    assert "held-out exact match" in outs[0]
    single = {r["step"]: r for r in read_metrics(tmp_path / "single") if "eval/exact_match" in r}
    multi = {r["step"]: r for r in read_metrics(tmp_path / "multi") if "eval/exact_match" in r}
    assert sorted(multi) == [0, 4]
    for step in multi:
        assert multi[step]["eval/loss"] == pytest.approx(single[step]["eval/loss"], abs=1e-5)
        assert multi[step]["eval/exact_match"] == single[step]["eval/exact_match"]


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_two_processes_match_one_dpo(tmp_path, reference):
    pairs = write_preference_jsonl(tmp_path / "pairs.jsonl", 48)
    overrides = [*DPO_OVERRIDES, f"data.train_path={pairs}", f"objective.dpo.reference={reference}"]
    outs = _compare(tmp_path, f"{REPO / 'configs' / 'dpo.py'}:loss=sigmoid", overrides)
    assert "reference:" in outs[0]
    if reference == "precomputed":
        assert (tmp_path / "multi" / "reference_logps" / "done.json").is_file()


@pytest.mark.slow
def test_two_processes_match_one_packed_dpo(tmp_path):
    """Packed pairs: a fixed data.shards packs the same rows for one process or two (same losses)."""
    pairs = write_preference_jsonl(tmp_path / "pairs.jsonl", 48)
    overrides = [*DPO_OVERRIDES, f"data.train_path={pairs}", "data.packing=True", "data.shards=2",
                 "data.max_pairs_per_row=4"]
    _compare(tmp_path, f"{REPO / 'configs' / 'dpo.py'}:loss=sigmoid", overrides)


GRPO_OVERRIDES = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "data.seq_len=48", "data.packing=False", "data.tokenizer_vocab_size=300",
    "data.builtin=", "objective.grpo.rewards=('instructions',)", "objective.grpo.reward_weights=(1.0,)",
    "objective.grpo.num_generations=4",
    "objective.grpo.max_completion_tokens=8", "objective.grpo.sample_every=0", "train.global_batch_size=8",
    "train.steps=3", "train.eval_every=0", "train.checkpoint_every=3", "train.log_every=1",
    "train.max_seconds=0.0", "train.async_checkpoints=False", "train.progress_bar=False", "optim.lr=1e-2",
    "mesh.rules=fsdp", "mesh.data=2", "mesh.fsdp=2",
]


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    [],
    # REINFORCE++: the KL to a copy of the start weights in the reward, token returns whitened over the
    # groups of both processes (moments gathered across them)
    ["objective.grpo.advantage_estimator=reinforce_pp", "objective.grpo.beta=0.05", "objective.grpo.kl_estimator=k1"],
], ids=["grpo", "reinforce_pp"])
def test_two_processes_sample_their_own_prompts_and_match_one_grpo(tmp_path, variant):
    """GRPO across 2 processes: each draws its own prompt (1 per process), the sampler runs once on
    both processes' prompts, each keeps and scores its own group. With every training prompt the
    same, that is exactly one process drawing 2 prompts: the same completions, rewards and losses."""
    words = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
    train = tmp_path / "prompts.jsonl"
    train.write_text("".join(json.dumps({"prompt": "Say a few words.", "words": words[i % 3], "constraints": [
        {"type": "word_count", "relation": "at most", "n": 3}]}) + "\n" for i in range(32)))
    overrides = [*GRPO_OVERRIDES, f"data.train_path={train}", *variant]
    config = str(REPO / "configs" / "grpo.py")
    run_cli(_train_args(config, tmp_path / "multi", [*overrides, "objective.grpo.num_prompts=1"]))
    _reference_run(config, tmp_path / "single", [*overrides, "objective.grpo.num_prompts=2"])
    single = {r["step"]: r for r in read_metrics(tmp_path / "single") if "loss" in r}
    multi = {r["step"]: r for r in read_metrics(tmp_path / "multi") if "loss" in r}
    assert sorted(multi) == sorted(single) == [1, 2, 3]
    assert len({r["rollout/reward"] for r in single.values()} | {0.0}) > 1  # rewards vary: a real test
    for step, row in single.items():
        assert multi[step]["completions"] == row["completions"] == 8
        for key in ("loss", "rollout/reward", "rollout/completion_len", "entropy"):
            assert multi[step][key] == pytest.approx(row[key], abs=TOLERANCE), (step, key)


@pytest.mark.slow
def test_kill_both_processes_then_resume_matches(tmp_path):
    """SIGKILL both processes mid-run; the same command resumes from the last checkpoint both
    agree on, and every step's loss still matches the uninterrupted single-process run."""
    config = str(_config_file(tmp_path))
    overrides = ["train.steps=40", "train.checkpoint_every=5", "data.eval_path="]
    workdir = tmp_path / "multi"
    procs = launch(_train_args(config, workdir, overrides))
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + PROCESS_TIMEOUT_S
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 12):
        if any(p.poll() is not None for p in procs):
            pytest.fail("a process ended before it was killed:\n" + "\n".join(wait(procs)[1]))
        time.sleep(0.05)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
    codes, _ = wait(procs)
    assert codes == [-signal.SIGKILL] * 2
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 10 <= saved[-1] < 40
    outs = run_cli(_train_args(config, workdir, overrides))
    assert "jaxtune: resuming from step" in outs[0]
    _reference_run(config, tmp_path / "single", overrides)
    _assert_same_losses(workdir, tmp_path / "single")


@pytest.mark.slow
def test_eval_and_generate_across_processes(tmp_path, capsys):
    """`jaxtune eval` and `jaxtune generate` on 2 processes give what one process gives."""
    config = str(_config_file(tmp_path))
    workdir = tmp_path / "run"
    _reference_run(config, workdir)
    single = tmp_path / "single_eval"
    shutil.copytree(workdir, single)
    assert cli.main(["eval", "--workdir", str(single)]) == 0
    prompts = ["--prompt", "reverse: cat dog =", "--prompt", "reverse: sun =", "--max_new_tokens", "6"]
    capsys.readouterr()
    assert cli.main(["generate", "--workdir", str(workdir), *prompts]) == 0
    expected = capsys.readouterr().out.splitlines()
    assert len(expected) == 2

    outs = run_cli(["eval", "--workdir", str(workdir)])
    want = json.loads((single / "eval_results.json").read_text())
    got = json.loads((workdir / "eval_results.json").read_text())
    assert "jaxtune: wrote" in outs[0] and "jaxtune: wrote" not in outs[1]
    assert _numbers(got) == pytest.approx(_numbers(want), rel=1e-5, abs=1e-6)
    outs = run_cli(["generate", "--workdir", str(workdir), *prompts])
    assert [line for line in outs[0].stdout.splitlines() if not _noise(line)] == expected
    assert not [line for line in outs[1].stdout.splitlines() if not _noise(line)]


def _numbers(tree, prefix=""):
    """{dotted key: value} of the numbers in a JSON tree (results files carry paths and times too)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{prefix}{key}.").items()
                if not k.startswith(("model", "time", "date"))}
    return {prefix.rstrip("."): tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


def _noise(line: str) -> bool:
    """gloo's connection lines, which it prints to stdout (the command's own output is compared)."""
    return line.startswith("[Gloo]") or not line


@pytest.mark.slow
def test_a_failing_process_stops_all_with_its_error(tmp_path):
    """A config that differs between processes is refused on all of them; a user error on one process
    (its config file is missing there) ends the other one too, with the same status and the cause."""
    config = str(_config_file(tmp_path))
    args = _train_args(config, tmp_path / "a")
    codes, outs = wait(launch(args, only={1: [*args, "--config.optim.lr=0.5"]}), timeout=120)
    assert codes == [2, 2], outs
    for out in outs:
        assert "jaxtune: error: process 1 runs with a different config than process 0" in out and "optim.lr" in out

    missing = _train_args(str(tmp_path / "missing.py"), tmp_path / "b")
    t0 = time.time()
    codes, outs = wait(launch(args, only={1: missing}), timeout=120)
    assert codes == [2, 2], outs
    assert "jaxtune: error: --config" in outs[1] and "no such file" in outs[1]
    assert "jaxtune: error: process 1 failed: --config" in outs[0]
    assert time.time() - t0 < 60  # not the 100 s heartbeat timeout


@pytest.mark.slow
def test_harness_across_processes(tmp_path):
    """`jaxtune eval --harness` on 2 processes: every process runs lm-eval's requests in lockstep (the
    model is sharded over both), process 0 writes the results, equal to one process's."""
    pytest.importorskip("lm_eval")
    from tests.test_harness_training import write_reverse_task

    config = str(_config_file(tmp_path))
    workdir = tmp_path / "run"
    _reference_run(config, workdir)
    tasks = str(write_reverse_task(tmp_path / "tasks"))
    args = ["eval", "--workdir", str(workdir), "--harness", "rev_mc", "--harness_include", tasks]
    assert cli.main([*args, "--output", str(tmp_path / "single.json")]) == 0
    outs = run_cli([*args, "--output", str(tmp_path / "multi.json")])
    assert "jaxtune: wrote" in outs[0]
    want = json.loads((tmp_path / "single.json").read_text())["results"]
    got = json.loads((tmp_path / "multi.json").read_text())["results"]
    assert _numbers(got) == pytest.approx(_numbers(want), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_two_processes_match_one_online_dpo_lora(tmp_path):
    """Online DPO under LoRA (the base is the reference) across 2 processes: each samples its own
    prompts' pairs in the one SPMD sampler call and ranks them; with every training prompt the same
    that is one process's run on all the prompts (the same pairs, scores and losses)."""
    train = tmp_path / "prompts.jsonl"
    train.write_text("".join(json.dumps({"prompt": "Say a few words.", "constraints": [
        {"type": "word_count", "relation": "at most", "n": 3}]}) + "\n" for _ in range(32)))
    overrides = [o.replace("objective.grpo.", "objective.online_dpo.") for o in GRPO_OVERRIDES
                 if "num_generations" not in o and "global_batch_size" not in o]
    overrides += [f"data.train_path={train}", "train.global_batch_size=4", "peft.method=lora", "peft.rank=4",
                  "objective.online_dpo.missing_eos_penalty=0.5"]
    config = str(REPO / "configs" / "online_dpo.py")
    run_cli(_train_args(config, tmp_path / "multi", overrides))
    _reference_run(config, tmp_path / "single", overrides)
    single = {r["step"]: r for r in read_metrics(tmp_path / "single") if "loss" in r}
    multi = {r["step"]: r for r in read_metrics(tmp_path / "multi") if "loss" in r}
    assert sorted(multi) == sorted(single) == [1, 2, 3]
    for step, row in single.items():
        assert row["objective/scores_margin"] >= 0  # ranked by score: the chosen one never scores lower
        for key in ("loss", "objective/scores", "objective/kl", "rewards/margins", "logps/chosen"):
            assert multi[step][key] == pytest.approx(row[key], abs=TOLERANCE), (step, key)


@pytest.mark.slow
def test_two_processes_match_one_ppo(tmp_path):
    """PPO with a separate value model and the adaptive KL coefficient across 2 processes: each
    samples its own prompts' completions in the one SPMD sampler call, the advantages are whitened
    with every process's moments and the KL controller steps on every process's KL, so with every
    training prompt the same it is one process's run on all the prompts (the same losses)."""
    train = tmp_path / "prompts.jsonl"
    train.write_text("".join(json.dumps({"prompt": "Say a few words.", "constraints": [
        {"type": "word_count", "relation": "at most", "n": 3}]}) + "\n" for _ in range(32)))
    overrides = [o.replace("objective.grpo.", "objective.ppo.") for o in GRPO_OVERRIDES
                 if "num_generations" not in o and "train.steps" not in o and "checkpoint_every" not in o]
    overrides += [f"data.train_path={train}", "train.steps=4", "train.checkpoint_every=4",
                  "objective.ppo.num_ppo_epochs=2", "objective.ppo.value_model=separate",
                  "objective.ppo.kl_controller=adaptive", "objective.ppo.kl_horizon=4.0", "objective.ppo.kl_target=0.5"]
    config = str(REPO / "configs" / "ppo.py")
    run_cli(_train_args(config, tmp_path / "multi", [*overrides, "objective.ppo.num_prompts=4"]))
    _reference_run(config, tmp_path / "single", [*overrides, "objective.ppo.num_prompts=8"])
    single = {r["step"]: r for r in read_metrics(tmp_path / "single") if "loss" in r}
    multi = {r["step"]: r for r in read_metrics(tmp_path / "multi") if "loss" in r}
    assert sorted(multi) == sorted(single) == [1, 2, 3, 4]
    assert single[3]["objective/kl_coef"] != single[1]["objective/kl_coef"]  # the controller moved it
    for step, row in single.items():
        for key in ("loss", "loss/policy_avg", "loss/value_avg", "objective/scores", "objective/kl",
                    "objective/kl_coef", "policy/clipfrac_avg"):
            assert multi[step][key] == pytest.approx(row[key], abs=TOLERANCE), (step, key)
