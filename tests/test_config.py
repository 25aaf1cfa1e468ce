import re
import textwrap

import ml_collections
import pytest

from jaxtune import config as config_lib
from jaxtune import sharding, validation
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
    c = validation.load_config(f"{config_file}:variant=tiny,steps=7", ["optim.lr=1e-4", "data.packing=false", "model.hidden_size=96"])
    assert c.train.steps == 7 and c.optim.lr == 1e-4 and c.data.packing is False and c.model.hidden_size == 96
    assert c.model.variant == "tiny"


def test_parse_arg_bare_word_is_variant():
    assert config_lib.parse_arg("llama3.2-1b,steps=3") == {"variant": "llama3.2-1b", "steps": "3"}
    assert config_lib.parse_arg(None) == {}


def test_unknown_key_names_closest(config_file):
    with pytest.raises(UserError, match=r"unknown config key 'optim\.lrr'; did you mean 'optim\.lr'"):
        validation.load_config(str(config_file), ["optim.lrr=1e-4"])
    with pytest.raises(UserError, match=r"did you mean 'train\.global_batch_size'"):
        validation.load_config(str(config_file), ["train.global_batchsize=8"])


def test_locked_config_rejects_new_keys(config_file):
    c = validation.load_config(str(config_file))
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
        validation.load_config(str(config_file), [override])


def test_starting_points_that_cannot_combine(config_file):
    """Checked for every objective (the state builder has one precedence, no silent choice)."""
    with pytest.raises(UserError, match="'model.hf_dir' and 'model.init_from' are both set"):
        validation.load_config(str(config_file), ["model.hf_dir=/m", "model.init_from=runs/sft"])
    with pytest.raises(UserError, match="'model.init_from' is not supported with LoRA"):
        validation.load_config(str(config_file), ["peft.method=lora", "model.init_from=runs/sft"])


def test_missing_file_and_missing_get_config(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        validation.load_config(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(UserError, match="defines no get_config"):
        validation.load_config(str(bad))


def test_batch_must_divide_data_parallel_size(config_file):
    c = validation.load_config(str(config_file), ["train.global_batch_size=12"])
    shape = sharding.resolve_mesh_shape(c.mesh, 8)
    assert shape == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(UserError, match="not divisible by the data-parallel size 8"):
        validation.validate_for_devices(c, shape, 1)
    c = validation.load_config(str(config_file), ["train.global_batch_size=16", "train.grad_accum_steps=4"])
    with pytest.raises(UserError, match="use a multiple of 32"):
        validation.validate_for_devices(c, shape, 1)


def test_mesh_resolution(config_file):
    c = validation.load_config(str(config_file), ["mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2"])
    assert sharding.resolve_mesh_shape(c.mesh, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    c = validation.load_config(str(config_file), ["mesh.fsdp=3"])
    with pytest.raises(UserError, match="does not divide"):
        sharding.resolve_mesh_shape(c.mesh, 8)
    c = validation.load_config(str(config_file), ["mesh.data=2", "mesh.fsdp=2"])
    with pytest.raises(UserError, match="there are 8 devices"):
        sharding.resolve_mesh_shape(c.mesh, 8)


def test_seq_len_beyond_model_max(config_file):
    c = validation.load_config(str(config_file), ["data.seq_len=4096"])
    with pytest.raises(UserError, match="exceeds the model's max_position_embeddings"):
        validation.validate_for_model(c, 2048)


def test_shipped_configs_load():
    for spec in ("configs/quickstart.py", "configs/quickstart.py:steps=5", "configs/sft_llama.py:tiny"):
        c = validation.load_config(spec, ["data.train_path=x.jsonl"] if "sft" in spec else [])
        assert c.train.steps > 0


# ---- old keys: one error naming the new key ----------------------------------------------------

OLD_KEYS = [  # (override, objective.type the config selects, what the error names)
    ("data.source=quickstart", "sft", "use data.builtin"),
    ("objective.prompts=gsm8k", "grpo", "data.builtin='verifiable'"),
    ("objective.beta=0.1", "dpo", "moved to 'objective.dpo.beta'"),
    ("objective.beta=0.1", "sft", "'objective.dpo.beta' / 'objective.grpo.beta' / 'objective.kto.beta'"),
    ("objective.loss_type=ipo", "dpo", "moved to 'objective.dpo.loss_type'"),
    ("objective.reference=copy", "kto", "moved to 'objective.kto.reference'"),
    ("objective.num_generations=4", "sft", "moved to 'objective.grpo.num_generations'"),
    ("objective.prompt_template={q}", "grpo", "moved to 'objective.grpo.prompt_template'"),
    ("objective.center_rewards_coefficient=0.01", "reward", "moved to 'objective.reward.center_rewards_coefficient'"),
]


@pytest.mark.parametrize("override, objective, new", OLD_KEYS)
def test_old_keys_name_the_new_key_on_the_command_line(config_file, tmp_path, capsys, override, objective, new):
    from jaxtune import cli

    argv = ["train", "--config", str(config_file), "--workdir", str(tmp_path / "w"),
            f"--config.objective.type={objective}", f"--config.{override}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxtune: error: config key ") and new in err[0], err


@pytest.mark.parametrize("line, new", [
    ('c.data.source = "jsonl"', "'data.source' was renamed: use data.builtin"),
    ("c.objective.type = 'dpo'; c.objective.beta = 0.1", "'objective.beta' moved to 'objective.dpo.beta'"),
    ("c.objective.type = 'grpo'; c.objective.prompts = 'verifiable'", "'objective.prompts' was renamed"),
    ("c.trian = 1", "unknown config key 'trian'; did you mean 'train'"),
    ("c.train.stepz = 1", "unknown config key 'train.stepz'; did you mean 'train.steps'"),
    ("c.objective.dpo = dict(betta=0.1); c.objective.type = 'dpo'", "'objective.dpo.betta'; did you mean 'objective.dpo.beta'"),
    ("c.objective.sfft = {}", "unknown config key 'objective.sfft'"),
])
def test_old_and_misspelt_keys_in_a_config_file(tmp_path, line, new):
    path = tmp_path / "old.py"
    path.write_text(f"from jaxtune.config import base_config\n\ndef get_config(arg=None):\n    c = base_config()\n"
                    f"    c.data.train_path = 'x.jsonl'\n    {line}\n    return c\n")
    with pytest.raises(UserError, match=re.escape(new)):
        validation.load_config(str(path), needs_data=False)


def test_objective_sections_selected_by_type(config_file):
    """Only the selected objective's section is in the config (printed, saved, validated); a section of
    another objective on the command line is an error; `objective.type` may come after its keys."""
    c = validation.load_config(str(config_file))
    assert c.objective.to_dict() == {"type": "sft", "sft": {}}
    c = validation.load_config(str(config_file), ["objective.dpo.beta=0.2", "objective.type=dpo"])
    assert set(c.objective) == {"type", "dpo"} and c.objective.dpo.beta == 0.2
    assert "num_generations" not in str(config_lib.to_json_dict(c))
    with pytest.raises(UserError, match=r"'objective\.grpo\.beta': objective\.grpo\.\* applies when "
                                        r"objective\.type='grpo'; this config's objective\.type is 'sft'"):
        validation.load_config(str(config_file), ["objective.grpo.beta=0.1"])
    with pytest.raises(UserError, match=r"unknown config key 'objective\.dpo\.bta'; did you mean 'objective\.dpo\.beta'"):
        validation.load_config(str(config_file), ["objective.type=dpo", "objective.dpo.bta=0.1"])
    c = validation.load_config(str(config_file), ["objective.type=preference", "objective.dpo.loss_type=ipo"])
    assert c.objective.type == "preference" and c.objective.dpo.loss_type == "ipo"  # the old spelling of dpo


def test_saved_configs_of_older_runs_are_upgraded():
    """A run saved with flat objective keys and data.source still builds its objective (eval, export)."""
    from jaxtune import objectives

    saved = config_lib.base_config().to_dict()
    saved["data"].pop("builtin")
    saved["data"]["source"] = "jsonl"
    for key in ("source_kind", "name", "split", "eval_split", "revision", "format"):  # keys added since
        saved["data"].pop(key)
    old_task = {k: v for k, v in config_lib.task_config(path="a.jsonl").to_dict().items()
                if k not in ("name", "revision", "data_files", "format")}
    saved["data"]["tasks"] = {"a": old_task}
    saved["objective"] = {"type": "preference", "beta": 0.3, "loss_type": "ipo", "num_generations": 8,
                          "reference": "auto", "prompts": "verifiable"}
    c = ml_collections.ConfigDict(saved)
    config_lib.upgrade_saved(c)
    assert c.data.builtin == "" and "source" not in c.data
    assert c.data.source_kind == "jsonl" and c.data.format == "fields"  # records read as they were then
    assert c.data.tasks.a.format == "fields" and c.data.tasks.a.revision == "" and c.data.tasks.a.path == "a.jsonl"
    objective = objectives.build(c)
    assert c.objective.dpo.beta == 0.3 and objective.loss_name() == "ipo" and set(c.objective) == {"type", "dpo"}


def test_the_leaf_loader_alone_points_to_jaxtune_load_config(config_file):
    """jaxtune.config sits below the objectives, so it cannot know their sections by itself."""
    with pytest.raises(UserError, match=r"load configs with jaxtune\.load_config\(spec, overrides\)"):
        config_lib.load_config(str(config_file))
