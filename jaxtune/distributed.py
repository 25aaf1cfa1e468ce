"""Multi-host start-up, and the decisions every process must make the same way.

jaxtune runs JAX's own multi-controller runtime: one Python process per host (TPU VM worker,
SLURM task, ...), all running the same command. `initialize` is called by the CLI and the Python
API before anything touches a device:

- on a TPU pod slice, under SLURM (srun) or Open MPI (mpirun) it calls `jax.distributed.initialize()`
  with no arguments and JAX reads the cluster's own description (TPU metadata server,
  SLURM_JOB_ID / SLURM_NTASKS / SLURM_PROCID ..., OMPI_* variables) - but only when that
  environment has more than one process;
- elsewhere the `--coordinator_address HOST:PORT --num_processes N --process_id I` flags, or the
  environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (flags win),
  start it explicitly; `--num_processes 1` switches auto-detection off;
- otherwise (one process) it does nothing.

Shared-filesystem assumption: all processes see the same workdir (and data files) at the same
path, e.g. a gs:// bucket, NFS or Filestore. Files written once (the tokenizer trained on first
use, metrics, eval results, the precomputed reference log-probs) are written by process 0 and
read by the others after a barrier.

Agreement: decisions (the step to resume from, whether precomputed reference log-probs are
complete, the config) are made once by process 0, or compared across all processes, through
the coordination service's key-value store, so no process can take a different branch and leave
the others waiting in a collective. A process that fails posts its error there; every other
process prints it and exits with the same status (`fail_all`, the watcher thread started here),
instead of hanging until the heartbeat timeout.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from jaxtune.errors import UserError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # also read by jax.distributed.initialize itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

# Long waits are fine: a failing process posts its error and the watcher ends the waiters early.
WAIT_TIMEOUT_S = 24 * 3600
# How long a failing process waits for the others to read its error before it exits.
FAILURE_ACK_TIMEOUT_S = 10
_COORDINATOR_GRACE_S = 1.0
WATCH_INTERVAL_S = 0.5  # how often a process checks whether another one failed
_FAILURE_KEY = "jaxtune/failure"
_counters: dict[str, itertools.count] = {}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Explicit multi-process settings (None: not given, auto-detect)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags, for every subcommand that touches devices."""
    group = parser.add_argument_group("multi-process (automatic on TPU pods, SLURM and Open MPI)")
    group.add_argument("--coordinator_address", default=None,
                       help=f"HOST:PORT of process 0, reachable from every process (env {ENV_COORDINATOR})")
    group.add_argument("--num_processes", type=int, default=None,
                       help=f"number of processes, one per host (env {ENV_NUM_PROCESSES}); 1 turns auto-detection off")
    group.add_argument("--process_id", type=int, default=None, help=f"this process, 0..num_processes-1 (env {ENV_PROCESS_ID})")


def parent_parser() -> argparse.ArgumentParser:
    """An argparse parent carrying the multi-process flags (`add_parser(..., parents=[parent_parser()])`)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser


def settings_from(args: Any = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags (attributes of `args`, when present) over environment variables."""
    environ = os.environ if environ is None else environ

    def pick(flag: str, env: str, cast):
        value = getattr(args, flag, None)
        if value is not None:
            return value
        raw = environ.get(env)
        if raw in (None, ""):
            return None
        try:
            return cast(raw)
        except ValueError:
            raise UserError(f"environment variable {env}={raw!r}: expected an integer") from None

    return Settings(pick("coordinator_address", ENV_COORDINATOR, str), pick("num_processes", ENV_NUM_PROCESSES, int),
                    pick("process_id", ENV_PROCESS_ID, int))


def detected_cluster() -> str | None:
    """The name of the multi-process cluster JAX would auto-detect here (slurm, ompi, gcetpu, gketpu, ...),
    or None when there is none or it runs a single process."""
    try:
        from jax._src import clusters  # JAX's own detectors, the ones initialize() uses
    except ImportError:  # pragma: no cover - moved in a future JAX: explicit settings still work
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present() and env.get_process_count() > 1:
                return env.name
        except Exception as e:  # a half-configured environment: not ours to fail on
            log.debug("cluster detection %s: %s", getattr(env, "name", env), e)
    return None


def validate(settings: Settings, cluster: str | None) -> None:
    """Clear errors for settings that cannot start (before JAX retries a connection for minutes)."""
    n, i = settings.num_processes, settings.process_id
    if n is not None and n < 1:
        raise UserError(f"--num_processes must be >= 1, got {n}")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        raise UserError(f"--process_id must be in 0..{(n or 1) - 1} (--num_processes {n}), got {i}")
    if n is not None and n > 1 and not cluster:
        missing = [name for name, v in (("--coordinator_address", settings.coordinator_address),
                                        ("--process_id", i)) if v is None]
        if missing:
            raise UserError(f"--num_processes {n} needs {' and '.join(missing)} too (or run under SLURM, Open MPI "
                            "or on a TPU pod, where they are detected)")
    if settings.coordinator_address is not None and ":" not in settings.coordinator_address:
        raise UserError(f"--coordinator_address {settings.coordinator_address!r}: expected HOST:PORT")


def initialize(settings: Settings | None = None, *, heartbeat_timeout_s: int = 100,
               initialization_timeout_s: int = 300) -> bool:
    """Starts the multi-process runtime when there is more than one process; returns whether it did.

    Idempotent (a second call, or a runtime someone else started, is left alone). Must run before
    any JAX call that initialises a backend (jax.devices(), an array, a jit).
    """
    import jax

    if jax.distributed.is_initialized():
        return process_count() > 1
    settings = settings or settings_from()
    cluster = None if settings.num_processes == 1 else detected_cluster()
    validate(settings, cluster)
    if settings.num_processes == 1 or not (settings.explicit or cluster):
        return False
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise UserError("multi-process start-up must come before anything uses JAX devices; call "
                        "jaxtune.distributed.initialize() first in the program")
    jax.distributed.initialize(settings.coordinator_address, settings.num_processes, settings.process_id,
                               initialization_timeout=initialization_timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
    log.info("process %d of %d (%s)", process_index(), process_count(), cluster or "explicit settings")
    if process_count() > 1:  # the runtime's numbers: no backend starts here (Hub downloads come first)
        _start_failure_watcher()
    return process_count() > 1


def _runtime():
    """JAX's multi-process runtime state: its process numbers are known without touching a device,
    so the agreement helpers below also work before any backend starts (Hub downloads do)."""
    from jax._src import distributed

    return distributed.global_state


def process_index() -> int:
    return _runtime().process_id


def process_count() -> int:
    return _runtime().num_processes


def is_multiprocess() -> bool:
    """True when this program runs as one of several processes (after `initialize`)."""
    import jax

    return jax.distributed.is_initialized() and process_count() > 1


def to_host(x) -> Any:
    """A (maybe multi-process) jax.Array as a numpy array on every process: shards that other
    processes hold are gathered (a collective: every process must call it)."""
    import jax
    import numpy as np

    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def _key(name: str) -> str:
    """A fresh key per call: every process makes the same calls in the same order."""
    n = next(_counters.setdefault(name, itertools.count()))
    return f"jaxtune/{name}/{n}"


def _encode(fn: Callable[[], Any]) -> str:
    try:
        return json.dumps({"value": fn()})
    except UserError as e:
        return json.dumps({"user_error": str(e)})


def _decode(text: str) -> Any:
    message = json.loads(text)
    if "user_error" in message:
        raise UserError(message["user_error"])
    return message["value"]


def share(fn: Callable[[], Any], name: str) -> Any:
    """fn() evaluated on process 0 only; every process returns its (JSON-able) result.

    A UserError raised by fn on process 0 is raised on every process. One process: just fn().
    """
    if not is_multiprocess():
        return fn()
    key = _key(name)
    if process_index() == 0:
        text = _encode(fn)
        _client().key_value_set(key, text)
    else:
        text = _client().blocking_key_value_get(key, WAIT_TIMEOUT_S * 1000)
    return _decode(text)


def on_first_process(fn: Callable[[], Any], name: str) -> None:
    """Runs fn() (e.g. writing a file to the shared workdir) on process 0 while the others wait for it."""
    share(lambda: (fn(), None)[1], name)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived."""
    if is_multiprocess():
        _client().wait_at_barrier(_key(name), WAIT_TIMEOUT_S * 1000)


def all_gather(value: Any, name: str) -> list[Any]:
    """Every process's JSON-able `value`, in process order (one process: ``[value]``).

    Through the coordination service, for small host-side values (prompt token lists, counts,
    flags): every process must make the same calls in the same order.
    """
    if not is_multiprocess():
        return [value]
    key = _key("gather/" + name)
    _client().key_value_set(f"{key}/{process_index()}", json.dumps(value))
    return [json.loads(_client().blocking_key_value_get(f"{key}/{p}", WAIT_TIMEOUT_S * 1000))
            for p in range(process_count())]


def agree(value: Any, what: str) -> None:
    """Raises the same UserError on every process unless all hold the same JSON-able `value`.

    The message names the first differing process and (for dicts) the differing dotted keys.
    """
    if not is_multiprocess():
        return
    values = [json.dumps(v, sort_keys=True) for v in all_gather(value, "agree/" + what)]
    for p, other in enumerate(values):
        if other != values[0]:
            diffs = _differences(json.loads(values[0]), json.loads(other))
            raise UserError(f"process {p} runs with a different {what} than process 0 (every process must run the "
                            f"same command): {'; '.join(diffs[:5]) or _digest(other)}")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out.extend(_differences(a.get(k), b.get(k), f"{prefix}{k}."))
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} vs {b!r}"]


def _digest(text: str) -> str:
    return "digest " + hashlib.sha256(text.encode()).hexdigest()[:12]


def fail_all(message: str, exit_code: int) -> None:
    """Ends a multi-process run from the process that failed: tells every other process (they print
    `message` and exit with `exit_code` too), waits briefly until they have read it, and exits.

    The exit skips JAX's shutdown barrier, which would wait for (or abort on) peers that are gone.
    Returns only in a single-process run, where the caller reports and exits as usual.
    """
    if not is_multiprocess():
        return
    me = process_index()
    try:
        _client().key_value_set(_FAILURE_KEY, json.dumps({"process": me, "message": message, "code": exit_code}))
    except Exception:  # another process failed first: its watcher here ends this process with its error
        time.sleep(FAILURE_ACK_TIMEOUT_S)
    else:
        for p in range(process_count()):
            if p != me:
                try:
                    _client().blocking_key_value_get(f"{_FAILURE_KEY}/ack/{p}", FAILURE_ACK_TIMEOUT_S * 1000)
                except Exception:  # that process is gone already
                    pass
        if me == 0:  # the coordinator leaves last: the others abort when it disappears under them
            time.sleep(_COORDINATOR_GRACE_S)
    _exit(exit_code)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _start_failure_watcher() -> None:
    """A daemon thread that ends this process as soon as another one reports a failure.

    It polls (a blocking C++ wait would still be running at interpreter exit and abort it), and
    an exit handler stops it before Python shuts down.
    """
    stop = threading.Event()

    def watch():
        while not stop.wait(WATCH_INTERVAL_S):
            try:
                text = _client().key_value_try_get(_FAILURE_KEY)
            except Exception:  # not set (or the runtime is shutting down)
                continue
            failure = json.loads(text)
            if failure["process"] == process_index():
                return
            print(f"jaxtune: error: process {failure['process']} failed: {failure['message']}", file=sys.stderr,
                  flush=True)
            try:
                _client().key_value_set(f"{_FAILURE_KEY}/ack/{process_index()}", "1")
                if process_index() == 0:
                    time.sleep(_COORDINATOR_GRACE_S)
            finally:
                _exit(failure["code"])

    thread = threading.Thread(target=watch, name="jaxtune-failure-watcher", daemon=True)
    thread.start()

    def stop_watching():
        stop.set()
        thread.join(timeout=2 * WATCH_INTERVAL_S + 1)

    atexit.register(stop_watching)


def quiet_other_processes() -> None:
    """Console output comes from process 0 only: the others' stdout goes to /dev/null (stderr stays,
    so their own errors and warnings still show)."""
    if is_multiprocess() and process_index() != 0:
        sys.stdout.flush()
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
