"""The bad-input corpus (tests/bad_inputs/): every case is a mistake a user can make, run through
`jaxtune.cli.main` in-process as the console script runs it.

Each case must: exit with status 2; end stderr with one `jaxtune: error: ...` line that names the
cause and where it is (the expected fragments below); print no traceback (no `--debug`); and leave
the workdir as it found it, so the next good run is unaffected (the slow test
`test_good_run_after_bad_input` runs that good command for every `train` case).

Static inputs live in tests/bad_inputs/files/; inputs that are large, binary or derived from a
model (damaged Hugging Face directories) are made by the fixtures below.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import cli, models, sharding
from jaxtune.data.tokenizers import train_sentencepiece
from jaxtune.models import hf
from tests.helpers import write_sft_jsonl

FILES = Path(__file__).parent / "bad_inputs" / "files"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # formatted with the `paths` fixture: {files} {good} {tok} {work} {hf_<damage>} ...
    expect: tuple[str, ...]  # fragments of the error line: the cause and its location
    setup: str = ""  # name of a setup function below that writes generated inputs into the tmp dir


TRAIN = ("train", "--config", "{files}/base.py:train={good},tokenizer={tok}", "--workdir", "{work}")
TRAIN_FRESH_TOKENIZER = ("train", "--config", "{files}/base.py:train={good}", "--workdir", "{work}")


def _data(path: str) -> tuple[str, ...]:
    return (*TRAIN, f"--config.data.train_path={path}")


def _chat(template: str) -> tuple[str, ...]:
    return ("train", "--config", f"{{files}}/chat.py:data={{files}}/chat.jsonl,template={{files}}/{template},"
            "tokenizer={tok}", "--workdir", "{work}")


def _hf(command: str, damage: str) -> tuple[str, ...]:
    d = f"{{hf_{damage}}}"
    return {
        "generate": ("generate", "--hf_dir", d, "--prompt", "reverse: cat dog ="),
        "eval": ("eval", "--workdir", "{work}", "--hf_dir", d),
        "convert": ("convert", "--hf_dir", d, "--out", "{work}"),
        "train": ("train", "--config", "{files}/base.py:train={good}", "--workdir", "{work}",
                  f"--config.model.hf_dir={d}"),
    }[command]


CASES = [
    # ---- data files
    Case("data_bad_json", _data("{files}/bad_json.jsonl"), ("bad_json.jsonl:4", "invalid JSON")),
    Case("data_wrong_type", _data("{files}/wrong_type.jsonl"), ("wrong_type.jsonl:3", "prompt", "list")),
    Case("data_missing_field", _data("{files}/missing_field.jsonl"), ("missing_field.jsonl:6", "response")),
    Case("data_null_field", _data("{files}/null_field.jsonl"), ("null_field.jsonl:5", "prompt")),
    Case("data_not_an_object", _data("{files}/not_an_object.jsonl"), ("not_an_object.jsonl:2", "expected a JSON object")),
    Case("data_json_array_file", _data("{files}/json_array.jsonl"), ("json_array.jsonl:1", "invalid JSON")),
    Case("data_empty_file", _data("{files}/empty.jsonl"), ("empty.jsonl", "no records")),
    Case("data_blank_lines_only", _data("{files}/blank_lines.jsonl"), ("blank_lines.jsonl", "no records")),
    Case("data_not_utf8", _data("{files}/latin1.jsonl"), ("latin1.jsonl:3", "UTF-8")),
    Case("data_binary_file", _data("{files}/binary.jsonl"), ("binary.jsonl:1", "UTF-8")),
    Case("data_empty_target", _data("{files}/empty_response.jsonl"), ("empty_response.jsonl:4", "empty")),
    Case("data_absurdly_long_line", _data("{tmp}/long.jsonl"), ("long.jsonl:2", "invalid JSON"), setup="long_line"),
    Case("data_missing_file", _data("{tmp}/nope.jsonl"), ("nope.jsonl", "no such data file")),
    Case("data_path_is_directory", _data("{files}"), ("files", "a directory, not a data file")),
    Case("data_bad_record_after_tokenizer", (*TRAIN_FRESH_TOKENIZER, "--config.data.train_path={tmp}/late_bad.jsonl"),
         ("late_bad.jsonl:65", "invalid JSON"), setup="late_bad_record"),
    # ---- templates
    Case("template_unknown_placeholder", (*TRAIN, "--config.data.templates=(('{question} =', ' {response}'),)"),
         ("question", "prompt")),
    Case("template_unbalanced_brace", (*TRAIN, "--config.data.templates=(('{prompt =', ' {response}'),)"),
         ("data.templates", "template 0", "{prompt =", "expected '}'")),
    Case("template_not_a_pair", (*TRAIN, "--config.data.templates=('{prompt}',)"), ("data.templates", "pair")),
    # ---- chat templates
    Case("chat_template_invalid_jinja", _chat("bad_jinja.jinja"), ("data.tasks.chat.chat_template", "line 2", "end of template")),
    Case("chat_template_sandbox_escape", _chat("sandbox_escape.jinja"), ("chat template", "unsafe")),
    Case("chat_template_unknown_filter", _chat("unknown_filter.jinja"), ("chat template", "no_such_filter")),
    # ---- configs
    Case("config_unknown_key", (*TRAIN, "--config.optim.lrr=1e-3"), ("optim.lrr", "did you mean 'optim.lr'")),
    Case("config_wrong_type", (*TRAIN, "--config.train.steps=many"), ("train.steps", "many")),
    Case("config_impossible_value", (*TRAIN, "--config.optim.lr=0"), ("'optim.lr' must be > 0",)),
    Case("config_batch_not_divisible", (*TRAIN, "--config.train.global_batch_size=12"), ("global_batch_size", "12")),
    Case("config_unknown_family", (*TRAIN, "--config.model.family=gpt9"), ("gpt9", "llama")),
    Case("config_encoder_decoder_objective", (*TRAIN, "--config.model.family=t5", "--config.model.variant=tiny",
                                              "--config.objective.type=grpo"),
         ("model.family", "'t5'", "encoder-decoder", "objective.type='grpo'", "sft", "docs/guides/t5.md")),
    Case("config_file_raises", ("train", "--config", "{files}/raises.py:small", "--workdir", "{work}"),
         ("raises.py", "line 6", "KeyError")),
    Case("config_file_syntax_error", ("train", "--config", "{files}/syntax_error.py", "--workdir", "{work}"),
         ("syntax_error.py", "SyntaxError")),
    Case("config_file_imports_missing", ("train", "--config", "{files}/imports_missing.py", "--workdir", "{work}"),
         ("imports_missing.py", "jaxtune_no_such_module")),
    Case("config_file_no_get_config", ("train", "--config", "{files}/no_get_config.py", "--workdir", "{work}"),
         ("no_get_config.py", "get_config")),
    Case("config_file_returns_dict", ("train", "--config", "{files}/returns_dict.py", "--workdir", "{work}"),
         ("returns_dict.py", "ConfigDict")),
    Case("config_file_missing", ("train", "--config", "{tmp}/nope.py", "--workdir", "{work}"), ("nope.py", "no such file")),
    # ---- tokenizers
    Case("tokenizer_missing", (*TRAIN, "--config.data.tokenizer={tmp}/none.model"), ("data.tokenizer", "none.model")),
    Case("tokenizer_corrupt_model", (*TRAIN, "--config.data.tokenizer={files}/corrupt_tokenizer.model"),
         ("corrupt_tokenizer.model", "not a valid SentencePiece model")),
    Case("tokenizer_json_invalid", (*TRAIN, "--config.data.tokenizer={files}/tokenizer_json_dir"),
         ("tokenizer.json", "tokenizer_json_dir")),
    Case("tokenizer_larger_than_embedding", (*TRAIN, "--config.model.vocab_size=100"),
         ("tokenizer", "280", "vocab_size", "100")),
    # ---- run directories and checkpoints
    Case("workdir_under_a_file", (*TRAIN[:-1], "{files}/base.py/run"), ("base.py", "workdir")),
    Case("resume_with_other_model_shapes", (*TRAIN[:-1], "{trained}", "--config.model.hidden_size=48"),
         ("checkpoints/2", "embed/embedding", "(280, 32)", "(280, 48)")),
    Case("generate_without_checkpoint", ("generate", "--workdir", "{tmp}", "--prompt", "hi"), ("checkpoints",)),
    # ---- Hugging Face model directories, for each command that reads one
    Case("hf_config_not_json_generate", _hf("generate", "config_not_json"), ("config.json", "invalid JSON", "line 2")),
    Case("hf_config_not_json_train", _hf("train", "config_not_json"), ("config.json", "invalid JSON")),
    Case("hf_config_missing_field_convert", _hf("convert", "config_missing_field"), ("config.json", "hidden_size")),
    Case("hf_config_unsupported_type_eval", _hf("eval", "config_unsupported"), ("config.json", "gpt2", "not supported")),
    Case("hf_truncated_safetensors_generate", _hf("generate", "truncated"), ("model.safetensors", "truncated")),
    Case("hf_truncated_safetensors_convert", _hf("convert", "truncated"), ("model.safetensors", "truncated")),
    Case("hf_truncated_safetensors_train", _hf("train", "truncated"), ("model.safetensors", "truncated")),
    Case("hf_corrupt_header_eval", _hf("eval", "corrupt_header"), ("model.safetensors", "corrupt safetensors header")),
    Case("hf_index_missing_shard_generate", _hf("generate", "missing_shard"),
         ("model.safetensors.index.json", "model-00002-of-", "does not exist")),
    Case("hf_index_missing_shard_train", _hf("train", "missing_shard"),
         ("model.safetensors.index.json", "does not exist")),
    Case("hf_wrong_shape_convert", _hf("convert", "wrong_shape"), ("model.embed_tokens.weight", "shape", "expected")),
    Case("hf_wrong_dtype_generate", _hf("generate", "wrong_dtype"), ("model.norm.weight", "I32", "floating-point")),
    Case("hf_missing_tokenizer_generate", _hf("generate", "no_tokenizer"), ("hf_no_tokenizer", "tokenizer.json", "tokenizer.model")),
    Case("hf_missing_tokenizer_train", _hf("train", "no_tokenizer"), ("hf_no_tokenizer", "tokenizer.json", "tokenizer.model")),
    Case("hf_missing_tokenizer_eval", _hf("eval", "no_tokenizer"), ("hf_no_tokenizer", "tokenizer.json", "tokenizer.model")),
    Case("hf_dir_missing_generate", ("generate", "--hf_dir", "{tmp}/nowhere", "--prompt", "hi"),
         ("nowhere", "no such directory")),
    # ---- command-line misuse
    Case("cli_missing_required_flag", ("train", "--config", "{files}/base.py"), ("--workdir", "required")),
    Case("cli_unknown_command", ("trian",), ("trian", "invalid choice")),
    Case("cli_convert_conflicting_flags", ("convert", "--hf_dir", "{hf_good}", "--workdir", "{run}", "--out", "{work}"),
         ("convert", "either --hf_dir DIR --out DIR")),
    Case("cli_generate_both_sources", ("generate", "--hf_dir", "{hf_good}", "--workdir", "{run}", "--prompt", "hi"),
         ("exactly one of --workdir",)),
    Case("cli_generate_no_prompt", ("generate", "--hf_dir", "{hf_good}"), ("--prompt",)),
    Case("cli_export_no_output", ("export", "--workdir", "{run}"), ("--peft", "--merged")),
    Case("cli_bad_override_syntax", (*TRAIN, "--config.train.steps"), ("train.steps", "KEY=VALUE")),
]


# ------------------------------------------------------------------ generated inputs


def long_line(tmp: Path) -> None:
    """A 4 MB line of JSON that never closes (e.g. a file cut mid-write), between good records."""
    good = json.dumps({"prompt": "p", "response": "r"})
    with (tmp / "long.jsonl").open("w") as f:
        f.write(good + "\n" + '{"prompt": "' + "x" * 4_000_000 + "\n" + good + "\n")


def late_bad_record(tmp: Path) -> None:
    """64 good records then a broken one: the tokenizer is trained (into the workdir) before the error."""
    path = write_sft_jsonl(tmp / "late_bad.jsonl")
    with path.open("a") as f:
        f.write('{"prompt": "cut off\n')


SETUPS = {"long_line": long_line, "late_bad_record": late_bad_record}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tokenizer, a tiny Hugging Face dir (random weights) and its damaged copies, a 2-step run."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good = write_sft_jsonl(root / "good.jsonl")
    texts = [json.loads(line)["prompt"] + " " + json.loads(line)["response"] for line in good.read_text().splitlines()]
    train_sentencepiece(texts * 4, root / "tok", vocab_size=280)
    paths = {"files": str(FILES), "good": str(good), "tok": str(root / "tok.model")}
    paths.update({f"hf_{k}": str(v) for k, v in _hf_dirs(root, root / "tok.model").items()})
    paths["run"] = str(root / "run")  # for usage errors found before any run directory is read
    return paths


@pytest.fixture(scope="module")
def trained(shared, tmp_path_factory):
    """A 2-step run of the good config (costs a compile: only the slow resume case uses it)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main([_fill(a, shared, work=str(workdir)) for a in TRAIN]) == 0
    return str(workdir)


def _tiny_hf_config():
    return models.get_config("llama", "tiny", vocab_size=288, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, max_position_embeddings=128)


def _hf_dirs(root: Path, tokenizer: Path) -> dict[str, Path]:
    config = _tiny_hf_config()
    model = models.build(config)
    params = sharding.unbox(jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32)))(jax.random.key(0))["params"])
    good = root / "hf_good"
    models.save_pretrained(config, params, good)
    shutil.copy(tokenizer, good / "tokenizer.model")
    sharded = root / "hf_sharded"
    models.save_pretrained(config, params, sharded, max_shard_size="40KB")
    dirs = {"good": good}

    def damaged(name: str, source: Path = good) -> Path:
        d = root / f"hf_{name}"
        shutil.copytree(source, d)
        dirs[name] = d
        return d

    (damaged("config_not_json") / "config.json").write_text('{"model_type": "llama",\n')
    d = damaged("config_missing_field")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    d = damaged("config_unsupported")
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2", hidden_size=32)))
    d = damaged("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    d = damaged("corrupt_header")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + data[8:])
    d = damaged("missing_shard", sharded)
    shutil.copy(tokenizer, d / "tokenizer.model")
    next(d.glob("model-00002-of-*.safetensors")).unlink()
    assert (d / "model.safetensors.index.json").exists()
    for name, change in (("wrong_shape", "model.embed_tokens.weight"), ("wrong_dtype", "model.norm.weight")):
        d = damaged(name)
        f = hf._SafetensorsFile(d / "model.safetensors")
        tensors = {n: f.read(n) for n in f.tensors}
        f.close()
        tensors[change] = (tensors[change][:, :16] if name == "wrong_shape" else tensors[change].astype(np.int32))
        hf.write_safetensors(d / "model.safetensors", tensors)
    (damaged("no_tokenizer") / "tokenizer.model").unlink()
    return dirs


# ------------------------------------------------------------------ the checks


def _fill(arg: str, paths: dict, **more: str) -> str:
    """`{name}` placeholders filled from `paths` and `more`; other braces (templates) are left alone."""
    for key, value in {**paths, **more}.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def _listing(path: Path) -> dict[str, float] | None:
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.stat().st_mtime for p in sorted(path.rglob("*"))}


def run_case(case: Case, shared: dict, tmp_path: Path, capsys, request) -> str:
    if case.setup:
        SETUPS[case.setup](tmp_path)
    work = tmp_path / "work"
    if "{trained}" in "".join(case.argv):
        shared = dict(shared, trained=request.getfixturevalue("trained"))
    argv = [_fill(a, shared, tmp=str(tmp_path), work=str(work)) for a in case.argv]
    before = {k: _listing(Path(shared[k])) for k in ("trained", "run") if k in shared}
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("jaxtune: error: "), err
    for fragment in case.expect:
        assert fragment in last, (fragment, last)
    assert len(last) < 600, last  # an error names the problem; it does not dump the input
    assert not work.exists() or not any(work.iterdir()), f"the failed command left {sorted(work.iterdir())}"
    assert {k: _listing(Path(shared[k])) for k in before} == before, "the failed command changed the trained run"
    return last


SLOW = {"resume_with_other_model_shapes"}  # needs a trained run (a compile); tests/test_checkpoint_faults.py has a fast one


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.name in SLOW else c for c in CASES],
                         ids=[c.name for c in CASES])
def test_bad_input(case, shared, tmp_path, capsys, request):
    run_case(case, shared, tmp_path, capsys, request)


def test_corpus_is_large_and_names_are_unique():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


# Every case checks that the workdir is left as it was (empty); these also run the good command after
# it: a failure after the tokenizer was trained into the workdir, one in the middle of the data, one
# found by the chat template's sandbox, one in a damaged HF dir, and a config typo.
GOOD_RUN_AFTER = ("data_bad_record_after_tokenizer", "data_bad_json", "chat_template_sandbox_escape",
                  "hf_truncated_safetensors_train", "config_unknown_key")


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.name in GOOD_RUN_AFTER], ids=lambda c: c.name)
def test_good_run_after_bad_input(case, shared, tmp_path, capsys, request):
    """After the failure, the good command in the same workdir trains from scratch and succeeds."""
    run_case(case, shared, tmp_path, capsys, request)
    work = tmp_path / "work"
    argv = [_fill(a, shared, work=str(work)) for a in TRAIN]
    assert cli.main(argv) == 0
    assert "resuming" not in capsys.readouterr().out


def test_print_table(shared, tmp_path_factory, capsys, request):
    """Not a check: writes the case -> message table the closing note quotes (BAD_INPUTS_TABLE=path)."""
    import os

    out = os.environ.get("BAD_INPUTS_TABLE")
    if not out:
        pytest.skip("set BAD_INPUTS_TABLE=path to write the table")
    rows = []
    for case in CASES:
        tmp = tmp_path_factory.mktemp(case.name)
        rows.append(f"| {case.name} | {run_case(case, shared, tmp, capsys, request).replace('|', '/')} |")
    Path(out).write_text("| case | message |\n| --- | --- |\n" + "\n".join(rows) + "\n")


