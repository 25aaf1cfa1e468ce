"""scripts/tpu_pod.sh and scripts/slurm.sbatch: printed commands, and the real scripts driven by
stand-ins for `gcloud` (4 workers as local directories) and `srun` (tasks as local processes).

Nothing here contacts Google Cloud or a SLURM controller; what the stand-ins cannot show (TPU VM
images, SSH, a real allocation) is listed in the README's "TPU pods" and "GPU clusters" sections.
"""

import os
import pathlib
import shlex
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = ROOT / "scripts" / "tpu_pod.sh"
SLURM = ROOT / "scripts" / "slurm.sbatch"
TRAIN = ["jaxtune", "train", "--config", "configs/sft_llama.py:llama3.2-1b", "--config.mesh.fsdp=-1",
         "--workdir", "gs://bucket/runs/sft"]


def run(args, env=None, **kw):
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120, **kw)


def commands(stdout: str) -> list[list[str]]:
    """The printed '+ ...' command lines (but the local `git ls-files | tar` pipeline), split as a shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ") and not line.startswith("+ git ")]


def test_tpu_pod_dry_run_prints_every_command_for_a_4_host_pod():
    out = run([TPU_POD, "--name", "pod", "--zone", "us-east5-a", "--type", "v5p-32", "--project", "proj",
               "--delete-after", "--dry-run", "--", *TRAIN])
    assert out.returncode == 0, out.stderr
    assert "v5p-32, 4 host(s)" in out.stdout
    cmds = commands(out.stdout)
    where = ["--zone=us-east5-a", "--project=proj"]
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert cmds[0] == [*gcloud, "describe", "pod", *where, "--format=value(state)"]
    assert cmds[1] == [*gcloud, "create", "pod", *where, "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5"]
    assert cmds[2][:5] + cmds[2][6:] == [*gcloud, "scp", "pod:jaxtune-src.tar.gz", *where, "--worker=all"]
    install, start, stream, status, delete = cmds[3:]
    assert install[:4 + 2 + len(where) + 1] == [*gcloud, "ssh", "pod", *where, "--worker=all"]
    assert "uv pip install" in install[-1] and "'jax[tpu]' -e \"$HOME/jaxtune[gcs]\"" in install[-1]
    assert start[-2] == "--worker=all" and shlex.join(TRAIN) in start[-1]  # the same command on every host
    assert stream[-2:] == ["--worker=0", stream[-1]] and stream[-1].startswith("--command=tail -n +1 -F --pid=")
    assert status[-2] == "--worker=all"
    assert delete == [*gcloud, "delete", "pod", *where, "--quiet"]
    assert "jaxtune-src-pod.tar.gz" in out.stdout  # the checkout is packed (printed, not run)


@pytest.mark.parametrize("accelerator,hosts", [("v4-32", 4), ("v5litepod-16", 4), ("v6e-8", 1), ("v5p-8", 1), ("v6e-256", 64)])
def test_tpu_pod_host_counts(accelerator, hosts):
    out = run([TPU_POD, "--name", "p", "--zone", "z", "--type", accelerator, "--reuse", "--skip-install", "--dry-run",
               "--", "true"])
    assert f"{accelerator}, {hosts} host(s)" in out.stdout
    assert "create" not in out.stdout  # --reuse never creates


@pytest.mark.parametrize("args,message", [
    (["--zone", "z", "--type", "v4-32", "--", "true"], "--name is required"),
    (["--name", "p", "--zone", "z", "--type", "v4-32"], "no command"),
    (["--name", "p", "--zone", "z", "--", "true"], "--type is required"),
    (["--name", "p", "--zone", "z", "--typo", "v4-32"], "unknown option '--typo'"),
    (["--name", "p", "--zone", "z", "--env", "NOVALUE", "--", "true"], "--env expects KEY=VALUE"),
])
def test_tpu_pod_usage_errors(args, message):
    out = run([TPU_POD, *args, "--dry-run"])
    assert out.returncode == 2 and message in out.stderr


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# gcloud compute tpus tpu-vm VERB ...: a 4-worker slice whose workers are $FAKE_POD/worker{0..3} (their $HOME).
echo "$*" >> "$FAKE_POD/gcloud.log"
shift 3; verb="$1"; shift
worker=0 command="" args=()
for a in "$@"; do
  case "$a" in --worker=*) worker="${a#--worker=}" ;; --command=*) command="${a#--command=}" ;; --*) ;; *) args+=("$a") ;; esac
done
workers=("$worker"); [[ "$worker" == all ]] && workers=(0 1 2 3)
case "$verb" in
  describe) [[ -d "$FAKE_POD/worker0" ]] ;;
  create) mkdir -p "$FAKE_POD"/worker{0,1,2,3} ;;
  delete) rm -rf "$FAKE_POD"/worker{0,1,2,3} ;;
  scp) for w in "${workers[@]}"; do cp "${args[0]}" "$FAKE_POD/worker$w/${args[1]#*:}"; done ;;
  ssh) rc=0; for w in "${workers[@]}"; do HOME="$FAKE_POD/worker$w" bash -c "$command" || rc=$?; done; exit $rc ;;
esac
"""

FAKE_UV = r"""#!/usr/bin/env bash
# uv venv ... PATH | uv pip install --python PY ...: make the venv's bin/ and record the install.
echo "uv $*" >> "$HOME/uv.log"
if [[ "$1" == venv ]]; then mkdir -p "${@: -1}/bin"; fi
"""


@pytest.fixture
def fake_pod(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("uv", FAKE_UV)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_POD": str(tmp_path), "TMPDIR": str(tmp_path)}
    return tmp_path, env


def test_tpu_pod_runs_the_command_on_every_worker(fake_pod):
    """The real script (not a dry run) against the stand-in: create, ship + install, start detached on
    all 4 workers, stream worker 0, report every status, delete. Quoting survives every hop."""
    pod, env = fake_pod
    program = "import os, sys; print('hello', os.environ['GREETING'], sys.argv[1:], os.getcwd() == os.path.expanduser('~/jaxtune'))"
    out = run([TPU_POD, "--name", "pod", "--zone", "z", "--type", "v4-32", "--env", "GREETING=it's me",
               "--delete-after", "--", sys.executable, "-c", program, "a b", "c'd"], env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "hello it's me ['a b', \"c'd\"] True" in out.stdout  # worker 0's log, streamed
    assert out.stdout.count("exit status 0") == 4  # every worker ran it
    log = (pod / "gcloud.log").read_text()
    assert "tpu-vm create pod" in log and "tpu-vm delete pod" in log
    assert not (pod / "worker0").exists()  # deleted after the run


def test_tpu_pod_exit_status_is_worker_0s(fake_pod):
    pod, env = fake_pod
    for w in range(4):  # installed by an earlier run
        (pod / f"worker{w}" / "jaxtune").mkdir(parents=True)
    out = run([TPU_POD, "--name", "pod", "--zone", "z", "--reuse", "--skip-install", "--", "bash", "-c", "exit 3"],
              env=env)
    assert out.returncode == 3
    assert "create" not in (pod / "gcloud.log").read_text()
    assert out.stdout.count("exit status 3") == 4


def test_tpu_pod_stop_signals_the_run_on_every_worker(fake_pod):
    """--stop sends SIGTERM to the command on every worker (jaxtune checkpoints and exits); the
    streaming launcher then returns worker 0's status."""
    pod, env = fake_pod
    for w in range(4):
        (pod / f"worker{w}" / "jaxtune").mkdir(parents=True)
    program = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); print('up', flush=True); time.sleep(60)"
    launcher = subprocess.Popen([TPU_POD, "--name", "pod", "--zone", "z", "--reuse", "--skip-install", "--",
                                 sys.executable, "-c", program], env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
    try:
        logs = [pod / f"worker{w}" / "jaxtune-run.log" for w in range(4)]
        deadline = time.time() + 60
        while not all(log.is_file() and "up" in log.read_text() for log in logs) and time.time() < deadline:
            time.sleep(0.2)
        stop = run([TPU_POD, "--name", "pod", "--zone", "z", "--stop"], env=env)
        assert stop.returncode == 0, stop.stderr
        assert launcher.wait(timeout=60) == 7
    finally:
        launcher.kill()
    assert launcher.stdout.read().count("exit status 7") == 4


@pytest.mark.parametrize("mode,tasks", [("gpu", 8), ("node", 1)])
def test_slurm_dry_run(mode, tasks):
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8", "JAXTUNE_PROCESS_PER": mode, "JAXTUNE_DRY_RUN": "1"}
    out = run(["bash", SLURM, *TRAIN], env=env)
    assert out.returncode == 0, out.stderr
    srun = next(shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ srun"))
    assert srun == ["srun", "--nodes=2", f"--ntasks-per-node={tasks}", "--kill-on-bad-exit=1", *TRAIN]
    assert f"{2 * tasks} JAX processes on 2 node(s)" in out.stdout
    assert ("JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in out.stdout) == (mode == "node")


@pytest.mark.parametrize("env,message", [
    ({}, "not inside a SLURM allocation"),
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": ""}, "no GPUs on the node"),
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8", "JAXTUNE_PROCESS_PER": "host"}, "must be 'gpu' or 'node'"),
])
def test_slurm_errors(env, message):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAXTUNE_"))}
    out = subprocess.run(["bash", SLURM, "jaxtune", "train"], capture_output=True, text=True, env={**base, **env})
    assert out.returncode == 2 and message in out.stderr


FAKE_SRUN = r"""#!/usr/bin/env python3
# srun --nodes=N --ntasks-per-node=T [--kill-on-bad-exit=1] CMD...: N*T local processes with the
# environment SLURM gives each task; all are killed when one fails.
import os, subprocess, sys, time
args = sys.argv[1:]
opts = {}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
procs = []
for rank in range(nodes * per_node):
    env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(nodes * per_node),
               SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node), SLURM_STEP_NUM_NODES=str(nodes))
    procs.append(subprocess.Popen(args, env=env))
while any(p.poll() is None for p in procs):
    if any(p.returncode not in (None, 0) for p in procs):
        for p in procs:
            p.kill()
    time.sleep(0.1)
sys.exit(max(p.returncode for p in procs))
"""

PROBE = textwrap.dedent("""
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()  # no arguments: JAX's SLURM detection
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    total = multihost_utils.process_allgather(jnp.array([jax.process_index()]))
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, ranks {total.ravel().tolist()}")
""")


@pytest.mark.slow  # two JAX processes
def test_slurm_script_starts_a_multi_process_jax_job(tmp_path):
    """slurm.sbatch through a stand-in srun: JAX's own SLURM detection forms one 2-process job."""
    (tmp_path / "srun").write_text(FAKE_SRUN)
    (tmp_path / "srun").chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "1",
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = run(["bash", SLURM, sys.executable, "-c", PROBE], env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in (0, 1):
        assert f"process {rank} of 2: 4 devices, ranks [0, 1]" in out.stdout
