"""A config file whose get_config raises (a user's bug in their own config code)."""


def get_config(arg=None):
    sizes = {"tiny": 32}
    return sizes[arg]  # KeyError for any other variant
