"""Configs: the schema (schema.py), loading and overrides (loading.py), key lookups (keys.py).

A leaf: it imports nothing of jaxtune but errors. Checks that need models, data or objectives are
jaxtune/validation.py's; `jaxtune.load_config` (the Python API) loads and validates in one call.
"""

from jaxtune.config.keys import RENAMED, all_keys
from jaxtune.config.loading import (ObjectiveSections, apply_overrides, load_config, parse_arg, select_objective,
                                    set_value, to_json_dict, upgrade_saved)
from jaxtune.config.schema import EVAL_METRICS, base_config, eval_task_config, task_config

__all__ = ["EVAL_METRICS", "RENAMED", "ObjectiveSections", "all_keys", "apply_overrides", "base_config",
           "eval_task_config", "load_config", "parse_arg", "select_objective", "set_value", "task_config",
           "to_json_dict", "upgrade_saved"]
