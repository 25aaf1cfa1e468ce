"""`jaxtune plan`: compile a run's train step without running it, and say whether it fits.

The run is built by `trainer.build_setup`, the same function `jaxtune train` uses, with an
abstract state (no weights allocated, no data read). The step is compiled for the local
devices, or for a TPU topology on a machine without TPUs (deviceless ahead-of-time compile
through libtpu, the `tpu` extra). XLA's compiled memory analysis gives the per-device memory;
its buffer assignment names the largest temporaries. FLOPs are analytic: XLA's cost analysis
counts a scanned layer stack once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxtune import metrics, platforms, trainer
from jaxtune.errors import UserError
from jaxtune import hf_check, loading

GiB = 1024**3
DEFAULT_HEADROOM = 0.9  # a plan fits when it needs at most this fraction of a device's memory

# HBM per chip by the exact device_kind TPUs report (real and compile-only devices alike).
# v5e and v5p: the "available HBM" XLA's out-of-memory message states; v4, v6e: datasheets.
TPU_HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": int(15.75 * GiB),  # v5e
    "TPU v5": int(95.74 * GiB),  # v5p
    "TPU v6 lite": 32 * GiB,  # v6e
}

# Cloud accelerator names -> (topology chip name, how many cores the name counts per chip).
_CLOUD_CHIPS = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5e": ("v5e", 1), "v5litepod": ("v5e", 1), "v6e": ("v6e", 1)}
_TOPOLOGY_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}


class DoesNotFit(Exception):
    """The step needs more memory than the devices have (the CLI exits 3 with this message)."""


def topology_name(name: str) -> str:
    """'v5p:2x2x1' as given, or a cloud name (v5p-8, v5litepod-8, v5e-8, v6e-8, v4-8) translated to it."""
    if re.fullmatch(r"[a-z0-9]+:\d+(x\d+)*", name):
        return name
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not match:
        raise UserError(f"--topology {name!r}: expected <chip>:<AxBxC> (e.g. v5p:2x2x1, v5e:2x4) or a cloud name "
                        "such as v5p-8, v5litepod-8, v5e-8, v6e-8, v4-8")
    chip, per_chip = _CLOUD_CHIPS[match.group(1)]
    cores = int(match.group(2))
    chips = cores // per_chip
    if chips < 1 or chips * per_chip != cores or chips & (chips - 1):
        raise UserError(f"--topology {name!r}: {cores} is not a valid {match.group(1)} slice size (a power of two"
                        f"{', counting 2 cores per chip' if per_chip == 2 else ''})")
    dims = [1] * _TOPOLOGY_DIMS[chip]
    if chip in ("v4", "v5p") and chips >= 4:
        dims = [2, 2, 1]
    while math.prod(dims) < chips:  # grow the last of the smallest sides: 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4
        smallest = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    return f"{chip}:{'x'.join(map(str, dims))}"


def tpu_devices(name: str, num_slices: int = 1) -> list:
    """Compile-only devices of a TPU topology (no TPU needed; libtpu must be installed)."""
    topology = topology_name(name)
    if not os.environ.get("TPU_LIBRARY_PATH"):
        try:
            import libtpu  # noqa: F401  (jax[tpu] installs it)
        except ImportError:
            raise UserError(
                f"--topology {name}: compiling for a TPU needs libtpu, which is not installed; install the tpu extra "
                f"(pip install -e \".[tpu]\", i.e. jax[tpu]=={jax.__version__})") from None
    # Compile-only use: don't take the lock a TPU VM's training process holds, and name this host.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if not platforms.accelerators_visible():
        # libtpu warns that it cannot tell this host's accelerator type; any valid name quiets it
        # (the compile follows `topology`, whatever this says: the plan is the same).
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    from jax.experimental import topologies

    try:
        kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices)
    except Exception as e:  # libtpu rejects the name: say which one
        raise UserError(f"--topology {name} ({topology}, {num_slices} slice(s)): libtpu cannot build it: "
                        f"{str(e).splitlines()[0]}") from None


def device_memory_bytes(device) -> int | None:
    """Memory of one device: the TPU table, else what the runtime reports (GPUs); None for CPUs."""
    if device.device_kind in TPU_HBM_BYTES:
        return TPU_HBM_BYTES[device.device_kind]
    try:
        stats = device.memory_stats()
    except Exception:  # compile-only or CPU devices have none
        stats = None
    return (stats or {}).get("bytes_limit")


@dataclasses.dataclass
class Plan:
    """What `jaxtune plan` reports; `to_json()` is its one-line summary."""

    config_name: str
    topology: str
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    dcn_mesh: dict[str, int]
    memory: dict[str, int]  # per device: argument, output, alias, temp, code, total
    hbm_bytes: int | None
    headroom: float
    fits: bool
    oom_message: str
    largest_temporaries: list[tuple[int, str, str]]  # (bytes, shape, HLO value)
    sharded_tensors: list[dict]
    flops_per_step: float
    executed_flops_per_step: float
    tokens_per_step: int
    peak_flops: float | None
    remat_policy: str
    vocab_size: int

    @property
    def step_time_lower_bound(self) -> float | None:
        """Seconds per step if every device ran the executed FLOPs at its peak."""
        if not self.peak_flops:
            return None
        return self.executed_flops_per_step / (self.peak_flops * self.num_devices)

    @property
    def mfu_bound(self) -> float:
        """The MFU such a step would log: model FLOPs / executed FLOPs (remat recompute, reference pass)."""
        return min(1.0, self.flops_per_step / self.executed_flops_per_step)

    def to_json(self) -> str:
        return json.dumps({
            "config": self.config_name, "topology": self.topology, "device_kind": self.device_kind,
            "devices": self.num_devices, "mesh": self.mesh, "dcn_mesh": self.dcn_mesh,
            "memory_per_device": self.memory, "hbm_per_device": self.hbm_bytes,
            "memory_fraction": (self.memory.get("total", 0) / self.hbm_bytes) if self.hbm_bytes else None,
            "fits": self.fits, "oom": self.oom_message or None,
            "largest_temporaries": [{"bytes": b, "shape": s, "value": v} for b, s, v in self.largest_temporaries],
            "flops_per_step": self.flops_per_step, "executed_flops_per_step": self.executed_flops_per_step,
            "tokens_per_step": self.tokens_per_step, "peak_flops_per_device": self.peak_flops,
            "step_time_lower_bound_s": self.step_time_lower_bound, "mfu_bound": self.mfu_bound,
            "remat_policy": self.remat_policy, "vocab_size": self.vocab_size,
        })


def plan(config: ml_collections.ConfigDict, *, config_name: str = "", topology: str | None = None,
         num_slices: int = 1, headroom: float = DEFAULT_HEADROOM, dump_dir: str | None = None) -> Plan:
    """Builds the run as `jaxtune train` would and compiles its step; never raises for out of memory
    (the Plan says fits=False and carries XLA's message)."""
    if num_slices < 1:
        raise UserError(f"--num_slices must be >= 1, got {num_slices}")
    if num_slices > 1 and not topology:
        raise UserError("--num_slices needs --topology (the local devices are what they are)")
    loading.pin_hub_ids(config)  # Hub ids: downloaded before any device is used
    if config.model.hf_dir:  # a damaged model directory fails here, naming the file (no tokenizer needed)
        hf_check.validate_hf_dir(loading.hf_dir(config), tokenizer=False)
    devices = tpu_devices(topology, num_slices) if topology else jax.devices()
    # vocab_size=None: the model's configured vocab (a from-scratch run's tokenizer would set it at
    # train time; training one here would read the data).
    setup = trainer.build_setup(config, devices)  # plan has no run yet: the objective is built here, once
    with tempfile.TemporaryDirectory() as tmp:
        dump = dump_dir or tmp
        oom = ""
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rule_table):
            lowered = setup.train_step.lower(*setup.abstract_args())
        try:
            compiled = lowered.compile(compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": True})
            stats = compiled.memory_analysis()
        except Exception as e:  # XLA's out-of-memory error is an XlaRuntimeError/JaxRuntimeError
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            oom, stats = _oom_summary(str(e)), None
        temporaries = largest_temporaries(dump)
    processes = len({getattr(d, "process_index", 0) for d in devices})
    memory = _memory(stats, setup.objective.plan_memory(setup, num_processes=processes))
    hbm = device_memory_bytes(devices[0])
    fits = not oom and (hbm is None or memory["total"] <= headroom * hbm)
    flops, executed, tokens = step_flops(config, setup)
    return Plan(
        config_name=config_name, topology=topology_name(topology) if topology else "local",
        device_kind=devices[0].device_kind, num_devices=len(devices), mesh=dict(setup.mesh.shape),
        dcn_mesh=setup.dcn_shape, memory=memory, hbm_bytes=hbm, headroom=headroom, fits=fits, oom_message=oom,
        largest_temporaries=temporaries, sharded_tensors=sharded_tensors(setup), flops_per_step=flops,
        executed_flops_per_step=executed, tokens_per_step=tokens,
        peak_flops=metrics.peak_flops_per_device(config.eval.peak_tflops, device_kind=devices[0].device_kind),
        remat_policy=setup.model_config.remat_policy, vocab_size=setup.model_config.vocab_size,
    )


def _memory(stats, held: dict[str, tuple[int, str]]) -> dict[str, int]:
    """Per device: XLA's sizes of the step, what the objective holds beside it (`held`:
    Objective.plan_memory, each as "objective:<name>"), and the peak of the two phases."""
    if stats is None:
        return {}
    memory = {
        "arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
        "code": stats.generated_code_size_in_bytes,
    }
    # Donated state is aliased: its buffers count once.
    step = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"] + memory["code"]
    if not held:
        memory["total"] = step
        return memory
    always = sum(n for n, when in held.values() if when == "always")
    sampling = sum(n for n, when in held.values() if when == "sampling")
    memory.update({f"objective:{name}": n for name, (n, _) in held.items()})
    # Training: the step plus what stays resident; sampling: the state (the step's arguments), what
    # stays resident and the sampler's own buffers (its smaller temporaries are not counted).
    memory["step_total"] = step + always
    memory["sampling_total"] = memory["arguments"] + always + sampling
    memory["total"] = max(memory["step_total"], memory["sampling_total"])
    return memory


def _oom_summary(message: str) -> str:
    """XLA's out-of-memory sentence (e.g. '... HLO temporaries (172.45G) exceeds available HBM (95.74G)')."""
    for line in message.splitlines():
        if "exceeds" in line or "Ran out of memory" in line or "RESOURCE_EXHAUSTED" in line:
            return line.strip().rstrip(".")
    return message.splitlines()[0].strip().rstrip(".")


_ALLOCATION = re.compile(r"^allocation \d+: size (\d+)(.*)$")
_VALUE = re.compile(r"^\s*value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (.+)$")
_NOT_TEMP = ("parameter", "output shape", "constant", "thread-local", "maybe-live-out")


def largest_temporaries(dump_dir: str | Path, top: int = 8) -> list[tuple[int, str, str]]:
    """(bytes, shape, HLO value) of the largest temporaries in XLA's buffer assignment of the step."""
    files = [p for p in Path(dump_dir).glob("*buffer-assignment.txt")]
    if not files:
        return []
    text = max(files, key=lambda p: p.stat().st_size).read_text(errors="replace")
    found: dict[str, tuple[int, str, str]] = {}
    in_temp = False
    for line in text.splitlines():
        header = _ALLOCATION.match(line)
        if header:
            in_temp = "preallocated-temp" in header.group(2) or not any(k in header.group(2) for k in _NOT_TEMP)
            continue
        value = _VALUE.match(line) if in_temp else None
        if value:
            name, size, shape = value.group(1), int(value.group(2)), value.group(3)
            shape = re.sub(r"\{[^}]*\}", "", shape).strip()  # drop layouts
            if size and (name not in found or found[name][0] < size):
                found[name] = (size, shape, name)
    return sorted(found.values(), reverse=True)[:top]


def sharded_tensors(setup: trainer.TrainSetup, top: int = 6) -> list[dict]:
    """The largest arrays of the train state: global shape, how they are split, bytes per device."""
    rows = []
    leaves = jax.tree_util.tree_leaves_with_path(setup.abstract_state)
    shardings = jax.tree.leaves(setup.state_shardings)
    for (path, leaf), sharding in zip(leaves, shardings):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        per_device = math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        rows.append({"name": jax.tree_util.keystr(path, simple=True, separator="/"), "shape": list(leaf.shape),
                     "dtype": str(leaf.dtype), "spec": str(sharding.spec), "bytes": nbytes, "per_device": per_device})
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:top]


def step_flops(config: ml_collections.ConfigDict, setup: trainer.TrainSetup) -> tuple[float, float, int]:
    """(model FLOPs, executed FLOPs, tokens) of one optimizer step, analytically.

    Model FLOPs are what the trainer's MFU counts: 6N + 12·L·d·T per token (forward + backward);
    an encoder-decoder's config counts both streams (`T5Config.train_flops`), per encoder token here.
    Executed FLOPs add what the step also does: remat 'full' recomputes the forward (+1/3), a LoRA
    base gets no weight gradients (-1/3 of the weight FLOPs), and a reference model runs a forward.
    """
    cfg = setup.model_config
    tokens = math.prod(setup.batch_shapes["inputs"].shape)  # rows x seq_len (a pair is two rows)
    if hasattr(cfg, "train_flops"):  # an encoder-decoder counts its two streams itself (T5Config.train_flops)
        rows, encoder_len = setup.batch_shapes["inputs"].shape
        decoder_len = setup.batch_shapes["decoder_inputs"].shape[1]
        per_token = cfg.train_flops(rows * encoder_len, rows * decoder_len, encoder_len, decoder_len) / tokens
        weights = cfg.train_flops(rows * encoder_len, rows * decoder_len, 0, 0) / tokens  # no attention scores
        attention = per_token - weights
    else:
        weights = 6.0 * setup.num_params
        attention = 12.0 * cfg.num_layers * cfg.hidden_size * config.data.seq_len
        per_token = metrics.train_flops_per_token(setup.num_params, cfg.num_layers, cfg.hidden_size, config.data.seq_len)
    executed = per_token
    if config.peft.method != "none":
        executed -= weights / 3
    if cfg.remat_policy == "full":
        executed += (weights + attention) / 3
    if setup.reference_kind in ("copy", "base"):
        executed += (weights + attention) / 3
    return per_token * tokens, executed * tokens, tokens


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def report(p: Plan, print_fn: Callable[[str], None] = print) -> None:
    """The human-readable plan, then one JSON line."""
    dcn = {k: v for k, v in p.dcn_mesh.items() if v > 1}
    mesh = " x ".join(f"{k}={v}" for k, v in p.mesh.items())
    print_fn(f"plan: {p.config_name or 'config'} on {p.topology}: {p.num_devices} x {p.device_kind}"
             + (f", {math.prod(dcn.values())} slices" if dcn else ""))
    print_fn(f"mesh: {mesh}" + (f" (across slices: {', '.join(f'{k}={v}' for k, v in dcn.items())})" if dcn else ""))
    print_fn("largest state arrays (global shape, sharding, per device):")
    for row in p.sharded_tensors:
        print_fn(f"  {row['name']:<48} {row['dtype']}{row['shape']} {row['spec']:<28} {_size(row['per_device'])}")
    if p.memory:
        m = p.memory
        print_fn(f"memory per device: arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} "
                 f"(aliased {_gib(m['aliased'])}), temporaries {_gib(m['temporaries'])}, code {_gib(m['code'])}")
        for key in (k for k in m if k.startswith("objective:")):
            print_fn(f"  held by the objective outside the step: {key.removeprefix('objective:')} {_gib(m[key])}")
        if "step_total" in m:
            print_fn(f"  peak of training (step + resident) {_gib(m['step_total'])} and sampling (state + resident + "
                     f"sampler) {_gib(m['sampling_total'])}")
        limit = f" of {_gib(p.hbm_bytes)} ({m['total'] / p.hbm_bytes:.0%}; fits at <= {p.headroom:.0%})" if p.hbm_bytes else ""
        print_fn(f"total per device: {_gib(m['total'])}{limit}")
    else:
        print_fn(f"out of memory: {p.oom_message}")
    if p.largest_temporaries:
        print_fn("largest temporaries (XLA buffer assignment):")
        for size, shape, name in p.largest_temporaries:
            print_fn(f"  {_size(size):>12}  {shape}  ({name})")
    print_fn(f"model FLOPs per step: {p.flops_per_step:.3e} ({p.tokens_per_step} tokens; executed incl. "
             f"remat/reference: {p.executed_flops_per_step:.3e})")
    if p.step_time_lower_bound is not None:
        print_fn(f"step time >= {p.step_time_lower_bound:.3g} s at {p.peak_flops / 1e12:.0f} TFLOP/s per device; "
                 f"MFU <= {p.mfu_bound:.0%} (remat {p.remat_policy})")
    else:
        print_fn(f"step time: unknown peak FLOP/s for {p.device_kind!r} (set eval.peak_tflops); "
                 f"MFU <= {p.mfu_bound:.0%} (remat {p.remat_policy})")
    print_fn(p.to_json())


def advice(config: ml_collections.ConfigDict, p: Plan) -> str:
    """What to try when a plan does not fit, from the settings that would shrink it."""
    tips = []
    if config.model.remat_policy != "full":
        tips.append("--config.model.remat_policy=full")
    if (config.mesh.fsdp == 1 or config.mesh.rules == "dp") and p.num_devices > 1:
        rules = " --config.mesh.rules=fsdp" if config.mesh.rules == "dp" else ""
        tips.append(f"--config.mesh.fsdp=-1 --config.mesh.data=1{rules} (shard weights and optimizer state over all devices)")
    if config.peft.method != "none" and config.peft.get("base_dtype", "") in ("", "float32") \
            and config.model.param_dtype == "float32":
        tips.append("--config.peft.base_dtype=bfloat16")
    tips.append("a smaller train.global_batch_size (or more train.grad_accum_steps)")
    return "; ".join(tips)


def failure_message(config: ml_collections.ConfigDict, p: Plan) -> str:
    if p.oom_message:
        what = f"out of memory on {p.topology}: {p.oom_message}"
    else:
        what = (f"needs {_gib(p.memory['total'])} per device, more than {p.headroom:.0%} of the "
                f"{_gib(p.hbm_bytes)} a {p.device_kind} has")
    return f"plan: {p.config_name or 'config'} does not fit: {what}; try {advice(config, p)}"


def run(config: ml_collections.ConfigDict, *, config_name: str = "", topology: str | None = None,
        num_slices: int = 1, headroom: float = DEFAULT_HEADROOM, dump_dir: str | None = None,
        print_fn: Callable[[str], None] = print) -> Plan:
    """Plans, prints the report; raises DoesNotFit (with the one-line reason) when it doesn't fit."""
    p = plan(config, config_name=config_name, topology=topology, num_slices=num_slices, headroom=headroom,
             dump_dir=dump_dir)
    report(p, print_fn)
    if not p.fits:
        raise DoesNotFit(failure_message(config, p))
    return p


__all__: Sequence[str] = ("plan", "run", "report", "topology_name", "tpu_devices", "DoesNotFit", "Plan")
