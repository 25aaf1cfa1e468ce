"""A config file that is not valid Python."""


def get_config(arg=None)
    return None
