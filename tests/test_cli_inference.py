"""`jaxtune generate` and `jaxtune eval` from a run's workdir and from a Hugging Face dir,
and their one-line errors (exit status 2)."""

import json
import shutil
import textwrap

import pytest

from jaxtune import cli, evaluate, inference
from jaxtune.data import pipeline
from jaxtune.generate import decode_completion, generate
from jaxtune.metrics import read_metrics
from tests.helpers import write_sft_jsonl

PROMPT = "reverse: cat dog ="
_LOWER, _NO_COMMA = ("change_case:english_lowercase", {}), ("punctuation:no_comma", {})
_SHORT = ("length_constraints:number_words", {"relation": "less than", "num_words": 4})
_LANGUAGE = ("language:response_language", {"language": "en"})  # langdetect, seeded
# IFEval's own format; 6 prompts like the eval set's, so generation reuses its compiled shapes
IFEVAL_RECORDS = [
    {"key": i, "prompt": f"reverse: {words}", "instruction_id_list": [n for n, _ in ins], "kwargs": [k for _, k in ins]}
    for i, (words, ins) in enumerate([("cat dog", [_LOWER, _SHORT]), ("sun moon", [_LOWER, _LANGUAGE]),
                                      ("red blue", [_NO_COMMA]), ("one two", [_LOWER]), ("up down", [_SHORT]),
                                      ("left right", [_LOWER, _NO_COMMA])])
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step tiny run with an eval set and two held-out eval tasks (generative, multiple choice),
    its config file, and its export as an HF dir."""
    root = tmp_path_factory.mktemp("cli")
    train, evals = write_sft_jsonl(root / "train.jsonl"), write_sft_jsonl(root / "eval.jsonl", n=6)
    ifeval = root / "ifeval.jsonl"  # IFEval's own format
    ifeval.write_text("".join(json.dumps(r) + "\n" for r in IFEVAL_RECORDS))
    config = root / "cfg.py"
    config.write_text(textwrap.dedent(f'''
        from jaxtune import config as config_lib
        from tests.helpers import tiny_base_config, with_eval_tasks

        def get_config(arg=None):
            c = with_eval_tasks(tiny_base_config({str(train)!r}), {str(root)!r})
            c.eval.tasks.ifeval = config_lib.eval_task_config("instructions", path={str(ifeval)!r},
                                                              templates=(("{{prompt}} =", ""),))
            c.train.steps = 4
            c.data.eval_path = {str(evals)!r}
            c.eval.batch_size = 8
            c.eval.max_new_tokens = 4
            c.eval.show_examples = 0
            return c
    '''))
    workdir = root / "run"
    assert cli.main(["train", "--config", str(config), "--workdir", str(workdir)]) == 0
    hf_dir = root / "hf"
    assert cli.main(["convert", "--workdir", str(workdir), "--hf_out", str(hf_dir)]) == 0
    return config, workdir, hf_dir


def _stdout(capsys, argv):
    capsys.readouterr()
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def test_generate_from_workdir_matches_api_and_hf_dir(run, capsys):
    _, workdir, hf_dir = run
    loaded = inference.from_workdir(str(workdir))
    tok = loaded.tokenizer
    tokens = generate(loaded.model, loaded.params, pipeline.tokenize_prompts(tok, [PROMPT]), max_new_tokens=6,
                      stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)[0]
    expected = decode_completion(tok.decode, tokens)
    args = ["--prompt", PROMPT, "--max_new_tokens", "6"]
    assert _stdout(capsys, ["generate", "--workdir", str(workdir), *args]) == expected + "\n"
    assert _stdout(capsys, ["generate", "--hf_dir", str(hf_dir), *args]) == expected + "\n"
    sampled = ["generate", "--workdir", str(workdir), *args, "--temperature", "0.9", "--top_k", "20", "--top_p", "0.9",
               "--seed", "3", "--prompt", "reverse: sun ="]
    first = _stdout(capsys, sampled)
    assert first == _stdout(capsys, sampled) and len(first.splitlines()) == 2
    if expected.strip():  # a stop string cuts the shown text before its first occurrence
        stop = expected.strip()[-1]
        cut = expected[: expected.find(stop)]
        assert _stdout(capsys, ["generate", "--workdir", str(workdir), *args, "--stop", stop]) == cut + "\n"


def test_eval_from_workdir_and_hf_dir(run, tmp_path, capsys):
    config, workdir, hf_dir = run
    out = _stdout(capsys, ["eval", "--workdir", str(workdir)])  # the checkpoint's saved config
    assert "exact_match:" in out and "perplexity:" in out
    result = json.loads((workdir / "eval_results.json").read_text())
    assert result["step"] == 4 and {"loss", "exact_match", "f1", "token_accuracy"} <= set(result["metrics"])
    assert any(r["step"] == 4 and "eval/loss" in r for r in read_metrics(workdir))

    other = tmp_path / "hf_eval"
    _stdout(capsys, ["eval", "--config", str(config), "--workdir", str(other), "--hf_dir", str(hf_dir)])
    from_hf = json.loads((other / "eval_results.json").read_text())["metrics"]
    assert from_hf["loss"] == pytest.approx(result["metrics"]["loss"], rel=1e-5)  # same weights, same numbers
    assert from_hf["exact_match"] == result["metrics"]["exact_match"]
    ifeval = {k: v for k, v in result["metrics"].items() if k.startswith("ifeval/")}  # metric 'instructions'
    assert {f"ifeval/{m}" for m in evaluate.INSTRUCTION_METRICS} <= set(ifeval)
    assert "ifeval/inst_level_loose_acc/language:response_language" in ifeval  # every IFEval id is scored
    assert all(0.0 <= v <= 1.0 for v in ifeval.values()) and "ifeval/prompt_level_strict_acc:" in out
    assert {k: from_hf[k] for k in ifeval} == ifeval  # greedy responses of the same weights


def test_eval_tasks_scored_before_and_after_training(run, capsys):
    config, workdir, _ = run
    named = {"heldout_qa/exact_match", "heldout_qa/f1", "heldout_qa/loss", "heldout_mc/accuracy", "heldout_mc/accuracy_norm",
             "ifeval/prompt_level_strict_acc", "ifeval/inst_level_loose_acc"}
    rows = {r["step"]: r for r in read_metrics(workdir) if "eval/heldout_mc/accuracy" in r}
    for step in (0, 4):  # before and after training, in metrics.jsonl and eval/step_<n>.json
        saved = json.loads((workdir / "eval" / f"step_{step}.json").read_text())["metrics"]
        assert named <= set(saved) and "exact_match" in saved
        for key in named:
            assert rows[step][f"eval/{key}"] == pytest.approx(saved[key])
            assert key.endswith("loss") or 0.0 <= saved[key] <= 1.0
    assert not any(k.startswith("exact_match/heldout") for k in saved)  # the named tasks stay out of the main set
    _stdout(capsys, ["eval", "--workdir", str(workdir), "--config", str(config), "--config.eval.num_shots=(0, 1)"])
    evaluated = json.loads((workdir / "eval_results.json").read_text())["metrics"]
    assert evaluated["heldout_mc/accuracy"] == pytest.approx(rows[4]["eval/heldout_mc/accuracy"])
    assert evaluated["ifeval/inst_level_loose_acc"] == rows[4]["eval/ifeval/inst_level_loose_acc"]  # zero-shot only
    for key in ("1shot/heldout_qa/exact_match", "1shot/heldout_qa/f1", "1shot/exact_match"):  # k-shot prompts
        assert 0.0 <= evaluated[key] <= 1.0


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxtune: error: "), err
    return err[0]


def test_errors(run, tmp_path, capsys):
    _, workdir, hf_dir = run
    assert "no checkpoints" in _error(capsys, ["generate", "--workdir", str(tmp_path), "--prompt", "x"])
    assert "no checkpoints" in _error(capsys, ["eval", "--workdir", str(tmp_path)])
    assert "empty" in _error(capsys, ["generate", "--workdir", str(workdir), "--prompt", " "])
    assert "--prompt" in _error(capsys, ["generate", "--workdir", str(workdir)])
    assert "exactly one" in _error(capsys, ["generate", "--workdir", str(workdir), "--hf_dir", str(hf_dir), "--prompt", "x"])
    bare = tmp_path / "bare_hf"
    shutil.copytree(hf_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    assert "tokenizer" in _error(capsys, ["generate", "--hf_dir", str(bare), "--prompt", "x"])
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved, ignore=shutil.ignore_patterns("tokenizer.model"))
    assert "tokenizer" in _error(capsys, ["generate", "--workdir", str(moved), "--prompt", "x"])
    no_config = tmp_path / "no_config"
    shutil.copytree(workdir, no_config)
    shutil.rmtree(no_config / "checkpoints" / "4" / "config")
    assert "no saved config; pass --config" in _error(capsys, ["generate", "--workdir", str(no_config), "--prompt", "x"])
    config = run[0]
    bad = tmp_path / "bad_ifeval.jsonl"  # an instructions task's record of an unknown constraint type
    bad.write_text(json.dumps(IFEVAL_RECORDS[0]) + "\n" + json.dumps({"prompt": "p", "constraints": [{"type": "rhyme"}]}) + "\n")
    eval_args = ["eval", "--workdir", str(workdir), "--config", str(config)]
    err = _error(capsys, [*eval_args, f"--config.eval.tasks.ifeval.path={bad}"])
    assert "bad_ifeval.jsonl:2: eval task 'ifeval'" in err and "unknown constraint type 'rhyme'" in err
    assert "'eval.tasks.ifeval.few_shot' is 1" in _error(capsys, [*eval_args, "--config.eval.tasks.ifeval.few_shot=1"])


# ----------------------------------------------------------------------------- generate --chat


def test_chat_loop_keeps_the_conversation(run):
    import io

    from jaxtune import chat_loop
    from jaxtune.data.tokenizers import encode_with_specials

    _, workdir, _ = run
    loaded = inference.from_workdir(str(workdir))
    tok = loaded.tokenizer
    template = chat_loop.choose_template("plain", tok)
    out, prompts = io.StringIO(), io.StringIO()
    sampling = chat_loop.Sampling(max_new_tokens=4)
    messages = chat_loop.chat(loaded.model, loaded.params, tok, template, stdin=io.StringIO("reverse: cat dog\n\nsun moon\n"),
                              stdout=out, sampling=sampling, system="be brief", show_prompt=prompts)
    replies = out.getvalue().splitlines()
    assert len(replies) == 2 and [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages if m["role"] == "assistant"] == replies
    first, second = prompts.getvalue().split("<s>")[1:]  # the plain template opens with BOS
    assert first == "System: be brief\nUser: reverse: cat dog\nAssistant:\n"
    # the second prompt holds the first exchange (reply + EOS), then the new user turn
    assert second == f"System: be brief\nUser: reverse: cat dog\nAssistant: {replies[0]}</s>\nUser: sun moon\nAssistant:\n"
    ids = encode_with_specials(tok, "<s>" + second[:-1])
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id and tok.eos_id in ids  # as SFT chat training tokenizes
    # the first reply is what plain generation gives for the rendered prompt, stopped at EOS
    expected = generate(loaded.model, loaded.params, [encode_with_specials(tok, "<s>" + first[:-1])], max_new_tokens=4,
                        stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)[0]
    assert replies[0] == decode_completion(tok.decode, expected).strip()


def test_chat_stop_tokens_and_end_of_turn(run):
    from tokenizers import Tokenizer, models

    from jaxtune import chat_loop
    from jaxtune.data.tokenizers import HFTokenizer

    sp = inference.from_workdir(str(run[1])).tokenizer
    assert chat_loop.end_of_turn(chat_loop.choose_template("plain", sp), sp) == sp.eos_token
    assert chat_loop.end_of_turn(chat_loop.choose_template("chatml", sp), sp) == "<|im_end|>"
    assert chat_loop.stop_tokens(sp, "<|im_end|>") == (sp.eos_id,)  # several SentencePiece pieces: a stop string only
    hf = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    hf.add_special_tokens(["<|im_end|>"])
    tok = HFTokenizer(hf.to_str(), {"eos_token": "</s>"})
    assert chat_loop.stop_tokens(tok, "<|im_end|>") == (1, 3)  # a single added token: stops on the device


def test_chat_cli(run, capsys, monkeypatch):
    import io

    _, workdir, _ = run
    monkeypatch.setattr("sys.stdin", io.StringIO("reverse: sun\nreverse: cat dog\n/exit\nnot read\n"))
    capsys.readouterr()
    assert cli.main(["generate", "--workdir", str(workdir), "--chat", "--chat_template", "chatml", "--max_new_tokens", "4",
                     "--show_prompt"]) == 0
    captured = capsys.readouterr()
    replies = captured.out.splitlines()
    assert len(replies) == 2 and "<|im_start|>user\nreverse: cat dog<|im_end|>" in captured.err
    assert f"<|im_start|>assistant\n{replies[0]}<|im_end|>\n<|im_start|>user\nreverse: cat dog" in captured.err
    assert "not read" not in captured.err
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert "no chat template" in _error(capsys, ["generate", "--workdir", str(workdir), "--chat"])
    assert "drop --prompt" in _error(capsys, ["generate", "--workdir", str(workdir), "--chat", "--prompt", "x",
                                              "--chat_template", "plain"])
