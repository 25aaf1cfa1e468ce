"""A config file importing a module that does not exist."""
import jaxtune_no_such_module  # noqa: F401


def get_config(arg=None):
    return None
