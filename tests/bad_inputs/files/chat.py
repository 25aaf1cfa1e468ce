"""A chat task whose template is the `template=` file: `chat.py:data=PATH,template=FILE,tokenizer=PATH`."""
from pathlib import Path

from jaxtune import config as config_lib
from tests.helpers import tiny_base_config


def get_config(arg=None):
    a = config_lib.parse_arg(arg)
    c = tiny_base_config("")
    c.data.tokenizer = a["tokenizer"]
    c.data.seq_len = 48
    c.data.tasks.chat = config_lib.task_config(path=a["data"], format="chat",
                                               chat_template=Path(a["template"]).read_text())
    c.train.steps = 2
    return c
