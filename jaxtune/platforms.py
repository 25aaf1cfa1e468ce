"""Which JAX platforms a jaxtune command starts: the CPU alone on a machine without accelerators.

With libtpu installed (the `tpu` and `test` extras) JAX tries to start a TPU backend on every
machine; without a TPU, libtpu prints "could not determine TPU accelerator type" and an
INVALID_ARGUMENT trace before every command and costs about a second. Where the machine has no
TPU and no GPU, the CPU is the only backend that can start, so commands ask JAX for it alone.
Compiling for a TPU topology (`jaxtune plan --topology`) needs no TPU backend and still works.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def accelerators_visible() -> bool:
    """True when a TPU or GPU is attached (or we cannot tell): then JAX chooses, as it does by default."""
    try:
        from jax._src import hardware_utils  # what JAX's own TPU/GPU start-up checks read (PCI ids, /dev)
    except ImportError:  # a JAX without it: leave the choice to JAX
        return True
    try:
        tpu_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
        return bool(tpu_chips or hardware_utils.has_visible_nvidia_gpu()
                    or hardware_utils.num_available_amd_gpus(stop_at=1))
    except (OSError, AttributeError, TypeError) as e:
        log.debug("could not look for accelerators (%s); JAX chooses the platform", e)
        return True


def cpu_only_without_accelerators() -> None:
    """Start only the CPU backend when no TPU or GPU is attached, unless the user chose the platforms
    (JAX_PLATFORMS) or forces a TPU start (JAX_FORCE_TPU_INIT). Call before JAX starts a backend."""
    if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ or accelerators_visible():
        return
    import jax

    os.environ["JAX_PLATFORMS"] = "cpu"  # for any process this one starts, too
    jax.config.update("jax_platforms", "cpu")
