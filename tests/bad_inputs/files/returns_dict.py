"""get_config returns a plain dict instead of an ml_collections.ConfigDict."""


def get_config(arg=None):
    return {"train": {"steps": 10}}
