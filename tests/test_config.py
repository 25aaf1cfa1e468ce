import textwrap

import pytest

from jaxtune import config as config_lib
from jaxtune.errors import UserError


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent('''
        """A test config: jaxtune train --config cfg.py"""
        from jaxtune.config import base_config, parse_arg

        def get_config(arg=None):
            c = base_config()
            c.data.train_path = "train.jsonl"
            args = parse_arg(arg)
            c.model.variant = args.get("variant", "tiny")
            if "steps" in args:
                c.train.steps = int(args["steps"])
            return c
    '''))
    return path


def test_load_with_arg_and_overrides(config_file):
    c = config_lib.load_config(f"{config_file}:variant=tiny,steps=7", ["optim.lr=1e-4", "data.packing=false", "model.hidden_size=96"])
    assert c.train.steps == 7 and c.optim.lr == 1e-4 and c.data.packing is False and c.model.hidden_size == 96
    assert c.model.variant == "tiny"


def test_parse_arg_bare_word_is_variant():
    assert config_lib.parse_arg("llama3.2-1b,steps=3") == {"variant": "llama3.2-1b", "steps": "3"}
    assert config_lib.parse_arg(None) == {}


def test_unknown_key_names_closest(config_file):
    with pytest.raises(UserError, match=r"unknown config key 'optim\.lrr'; did you mean 'optim\.lr'"):
        config_lib.load_config(str(config_file), ["optim.lrr=1e-4"])
    with pytest.raises(UserError, match=r"did you mean 'train\.global_batch_size'"):
        config_lib.load_config(str(config_file), ["train.global_batchsize=8"])


def test_locked_config_rejects_new_keys(config_file):
    c = config_lib.load_config(str(config_file))
    with pytest.raises(AttributeError):
        c.optim.new_key = 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=0", "'optim.lr' must be > 0"),
        ("optim.lr=-1e-3", "'optim.lr' must be > 0"),
        ("train.steps=0", "'train.steps' must be > 0"),
        ("optim.schedule=cosinus", "expected one of cosine, linear, constant"),
        ("mesh.rules=zero3", "expected one of dp, fsdp, fsdp_tp"),
        ("train.steps=abc", "expected an integer"),
        ("data.packing=maybe", "expected true or false"),
        ("data.word_dropout=1.5", "'data.word_dropout' must be in"),
    ],
)
def test_impossible_values_rejected(config_file, override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        config_lib.load_config(str(config_file), [override])


def test_starting_points_that_cannot_combine(config_file):
    """Checked for every objective (the state builder has one precedence, no silent choice)."""
    with pytest.raises(UserError, match="'model.hf_dir' and 'model.init_from' are both set"):
        config_lib.load_config(str(config_file), ["model.hf_dir=/m", "model.init_from=runs/sft"])
    with pytest.raises(UserError, match="'model.init_from' is not supported with LoRA"):
        config_lib.load_config(str(config_file), ["peft.method=lora", "model.init_from=runs/sft"])


def test_missing_file_and_missing_get_config(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        config_lib.load_config(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(UserError, match="defines no get_config"):
        config_lib.load_config(str(bad))


def test_batch_must_divide_data_parallel_size(config_file):
    c = config_lib.load_config(str(config_file), ["train.global_batch_size=12"])
    shape = config_lib.resolve_mesh_shape(c, 8)
    assert shape == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(UserError, match="not divisible by the data-parallel size 8"):
        config_lib.validate_for_devices(c, shape, 1)
    c = config_lib.load_config(str(config_file), ["train.global_batch_size=16", "train.grad_accum_steps=4"])
    with pytest.raises(UserError, match="use a multiple of 32"):
        config_lib.validate_for_devices(c, shape, 1)


def test_mesh_resolution(config_file):
    c = config_lib.load_config(str(config_file), ["mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2"])
    assert config_lib.resolve_mesh_shape(c, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    c = config_lib.load_config(str(config_file), ["mesh.fsdp=3"])
    with pytest.raises(UserError, match="does not divide"):
        config_lib.resolve_mesh_shape(c, 8)
    c = config_lib.load_config(str(config_file), ["mesh.data=2", "mesh.fsdp=2"])
    with pytest.raises(UserError, match="there are 8 devices"):
        config_lib.resolve_mesh_shape(c, 8)


def test_seq_len_beyond_model_max(config_file):
    c = config_lib.load_config(str(config_file), ["data.seq_len=4096"])
    with pytest.raises(UserError, match="exceeds the model's max_position_embeddings"):
        config_lib.validate_for_model(c, 2048)


def test_shipped_configs_load():
    for spec in ("configs/quickstart.py", "configs/quickstart.py:steps=5", "configs/sft_llama.py:tiny"):
        c = config_lib.load_config(spec, ["data.train_path=x.jsonl"] if "sft" in spec else [])
        assert c.train.steps > 0
