"""Test setup: 8 fake CPU devices so sharding is exercised; nothing is downloaded."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests.reference_run import reference_run  # noqa: E402,F401 (one shared uninterrupted run for the fault tests)
