"""`jaxtune data self-instruct` / `jaxtune data evolve` end to end on a tiny random model (an HF dir),
the real sampler behind the `Sampler` interface, and the commands' one-line errors (exit status 2)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import cli, generate, inference, models, sharding
from jaxtune.data import pipeline
from jaxtune.data.tokenizers import train_sentencepiece
from jaxtune.datatools.sampling import ModelSampler
from jaxtune.datatools.self_instruct import instruction_prompt
from tests.datatools.fakes import SEED_TASKS, write_seed_file


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A 2-layer d32 Llama with random weights and a tokenizer trained on prompt-like text."""
    root = tmp_path_factory.mktemp("selfinst")
    texts = [json.dumps(t) for t in SEED_TASKS] + ["Task: Example 1\nInput: Output: Class label: Classification: Yes No"]
    train_sentencepiece(texts * 8, root / "tok" / "tokenizer", vocab_size=360)
    config = models.get_config("llama", "tiny", vocab_size=360, hidden_size=32, intermediate_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, max_position_embeddings=4096)
    model = models.build(config)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32)), jax.random.key(0))["params"]
    rng = np.random.default_rng(0)  # random weights without compiling an init
    params = jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.2).astype(a.dtype), sharding.unbox(shapes))
    out = root / "hf"
    models.save_pretrained(config, params, out, tokenizer_dir=str(root / "tok"))
    return out


def test_model_sampler_is_generate_with_stop_strings(hf_dir):
    loaded = inference.load(workdir=None, hf_dir=str(hf_dir))
    # Prompts and sampling as the self-instruct test's first stage, so the two share one compiled loop.
    seeds = [t["instruction"] for t in SEED_TASKS]
    prompts = [instruction_prompt(seeds[:3]), instruction_prompt(seeds[1:])]
    sampling = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=4)
    tok = loaded.tokenizer
    raw = generate.generate(loaded.model, loaded.params, pipeline.tokenize_prompts(tok, prompts), **sampling,
                            stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)
    got = ModelSampler(loaded, batch_size=2).complete(prompts, **sampling)
    for row, completion in zip(raw, got):
        assert completion.text == tok.decode(row) and completion.num_tokens == len(row)
        assert completion.truncated == (len(row) == 12)
    stops = [c.text.strip()[:1] for c in got if c.text.strip()]
    if stops:  # a stop string cuts the text and the completion no longer counts as truncated (same shapes: no compile)
        cut = ModelSampler(loaded, batch_size=2).complete(prompts, **sampling, stop=stops[:1])
        for full, short in zip(got, cut):
            assert short.text == full.text.split(stops[0])[0]
            assert short.truncated == (full.truncated and stops[0] not in full.text)


def test_model_sampler_chat_template_wraps_prompts_in_a_user_turn(hf_dir):
    loaded = inference.load(workdir=None, hf_dir=str(hf_dir))
    sampler = ModelSampler(loaded, chat_template="chatml")
    text = loaded.tokenizer.decode(sampler.encode(["List three colors."])[0])
    assert text.endswith("<|im_start|>user\nList three colors.<|im_end|>\n<|im_start|>assistant\n")
    assert sampler.end_text == "<|im_end|>" and loaded.tokenizer.eos_id in sampler.stop_ids
    assert ModelSampler(loaded).encode(["x"]) == pipeline.tokenize_prompts(loaded.tokenizer, ["x"])


def _run(capsys, argv):
    capsys.readouterr()
    status = cli.main(argv)
    return status, capsys.readouterr()


def test_self_instruct_command_end_to_end_and_resume(hf_dir, tmp_path, capsys):
    seeds = write_seed_file(tmp_path / "seeds.jsonl")
    out = tmp_path / "si.jsonl"
    argv = ["data", "self-instruct", "--hf_dir", str(hf_dir), "--seed_file", str(seeds), "--output", str(out),
            "--num_instructions", "2", "--num_seed_examples", "2", "--num_machine_examples", "1", "--batch_size", "2",
            "--max_new_tokens", "12", "--instance_max_new_tokens", "12", "--min_words", "1",
            "--temperature", "1.0", "--top_p", "0.9", "--seed", "3"]
    status, captured = _run(capsys, [*argv, "--max_requests", "2"])
    assert status == 0, captured.err
    assert "instructions/s" in captured.out and "generated tokens/s" in captured.out
    report = [json.loads(line) for line in (tmp_path / "si.jsonl.report.jsonl").read_text().splitlines()]
    assert [r.get("batch") for r in report] == [None, 0] and report[1]["generated_tokens"] > 0
    before = out.read_text()
    status, captured = _run(capsys, [*argv, "--max_requests", "4"])  # resumes: one more batch appended
    assert status == 0, captured.err
    report = [json.loads(line) for line in (tmp_path / "si.jsonl.report.jsonl").read_text().splitlines()]
    assert [r.get("batch") for r in report] == [None, 0, 1] and out.read_text().startswith(before)
    for record in map(json.loads, out.read_text().splitlines()):  # whatever the random model got through
        assert {"instruction", "input", "output", "id", "request", "batch"} <= set(record)


def test_evolve_command_end_to_end(hf_dir, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"instruction": t["instruction"]}) + "\n" for t in SEED_TASKS[:2]))
    out = tmp_path / "ev.jsonl"
    argv = ["data", "evolve", "--hf_dir", str(hf_dir), "--input", str(inputs), "--output", str(out), "--rounds", "1",
            "--batch_size", "2", "--max_new_tokens", "12", "--response_max_new_tokens", "12", "--no_gain_threshold", "1.0",
            "--chat_template", "chatml"]
    status, captured = _run(capsys, argv)
    assert status == 0, captured.err
    assert "evolved instructions" in captured.out and "generated tokens/s" in captured.out
    report = [json.loads(line) for line in (tmp_path / "ev.jsonl.report.jsonl").read_text().splitlines()]
    assert [r.get("batch") for r in report] == [None, 0]
    assert sum(r["kept"] + len(r["dropped"]) for r in report[1:]) == 2
    assert len(out.read_text().splitlines()) == sum(r["kept"] for r in report[1:])


@pytest.mark.parametrize("setup, args, message", [
    (None, ["--seed_file", "{tmp}/none.jsonl"], "seed file {tmp}/none.jsonl: no such file"),
    ('{"instruction": "a", "instances": [{"input": "", "output": "b"}]}\n{oops\n', ["--seed_file", "{tmp}/s.jsonl"],
     "seed file {tmp}/s.jsonl:2: invalid JSON"),
    ('{"instances": [{"input": "", "output": "b"}]}\n', ["--seed_file", "{tmp}/s.jsonl"],
     "{tmp}/s.jsonl:1: field 'instruction' is missing"),
    ("seeds", ["--seed_file", "{tmp}/s.jsonl", "--workdir", "{tmp}/empty_run"], "empty_run"),
    ("seeds", ["--seed_file", "{tmp}/s.jsonl"], "give exactly one of --workdir"),
    ("seeds", ["--seed_file", "{tmp}/s.jsonl", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
])
def test_self_instruct_command_errors(tmp_path, capsys, setup, args, message):
    _check_error(tmp_path, capsys, "self-instruct", setup, args, message)


@pytest.mark.parametrize("setup, args, message", [
    (None, ["--input", "{tmp}/none.jsonl"], "input file {tmp}/none.jsonl: no such file"),
    ('{"instruction": "a"}\n{"instruction": 3}\n', ["--input", "{tmp}/s.jsonl"],
     "{tmp}/s.jsonl:2: field 'instruction' is empty or not text"),
    ('{"instruction": "a"}\n', ["--input", "{tmp}/s.jsonl", "--workdir", "{tmp}/empty_run"], "empty_run"),
    ('{"instruction": "a"}\n', ["--input", "{tmp}/s.jsonl", "--mutations", "deepen,shrink"], "--mutations: unknown shrink"),
    ('{"instruction": "a"}\n', ["--input", "{tmp}/s.jsonl", "--rounds", "0"], "--rounds must be >= 1"),
])
def test_evolve_command_errors(tmp_path, capsys, setup, args, message):
    _check_error(tmp_path, capsys, "evolve", setup, args, message)


def _check_error(tmp_path, capsys, command, setup, args, message):
    if setup == "seeds":
        write_seed_file(tmp_path / "s.jsonl")
    elif setup:
        (tmp_path / "s.jsonl").write_text(setup)
    (tmp_path / "empty_run").mkdir()
    argv = ["data", command, "--output", str(tmp_path / "o.jsonl"), *[a.format(tmp=tmp_path) for a in args]]
    status, captured = _run(capsys, argv)
    assert status == 2
    assert captured.err.startswith("jaxtune: error: ") and message.format(tmp=tmp_path) in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()  # nothing written: a corrected rerun starts clean
