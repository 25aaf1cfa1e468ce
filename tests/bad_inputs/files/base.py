"""The good tiny config the bad-input cases start from: `base.py:train=PATH[,tokenizer=PATH]`."""
from jaxtune import config as config_lib
from tests.helpers import tiny_base_config


def get_config(arg=None):
    a = config_lib.parse_arg(arg)
    c = tiny_base_config(a.get("train", ""))
    c.data.tokenizer = a.get("tokenizer", "")
    c.train.steps = 2
    return c
