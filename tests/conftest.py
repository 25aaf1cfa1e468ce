"""Test setup: 8 fake CPU devices so sharding is exercised; nothing is downloaded: every Hugging
Face Hub request goes to the session's stand-in Hub on 127.0.0.1 (tests/hub_fixture.py), started
here before anything imports huggingface_hub."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.hub_fixture import hub, hub_offline, hub_token, start_session_hub  # noqa: F401

start_session_hub()

from tests.reference_run import reference_run  # noqa: E402,F401 (one shared uninterrupted run for the fault tests)
