"""A Python file without get_config."""

CONFIG = {"train": {"steps": 10}}
