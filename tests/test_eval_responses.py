"""`jaxtune eval --responses`: precomputed responses scored with no model (IFEval and generative)."""

import json
import re

import pytest

from jaxtune import cli
from jaxtune.rewards.instructions import as_constraints, satisfied

PROMPTS = [
    {"key": 1, "prompt": "Write about cats.", "instruction_id_list": ["punctuation:no_comma", "keywords:letter_frequency"],
     "kwargs": [{}, {"letter": "#", "let_relation": "at least", "let_frequency": 2}]},  # Google's file asks for '#'
    {"key": 2, "prompt": "Antworte auf Deutsch.", "instruction_id_list": ["language:response_language"],
     "kwargs": [{"language": "de"}]},
    {"key": 3, "prompt": "List two things.", "instruction_id_list": ["detectable_format:number_bullet_lists"],
     "kwargs": [{"num_bullets": 2, "relation": None}]},  # the HF copy's nulls
]
RESPONSES = [
    {"prompt": "Write about cats.", "response": "# Cats\n## Why, cats"},  # '#' x3, but a comma
    {"prompt": "Antworte auf Deutsch.", "response": "Der Hund läuft schnell über die Straße und die Katze schläft."},
    {"prompt": "List two things.", "response": "Sure:\n* one\n* two"},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_google_response_file_scored_against_input_data(tmp_path, capsys):
    prompts, responses = _write(tmp_path / "input_data.jsonl", PROMPTS), _write(tmp_path / "resp.jsonl", RESPONSES)
    out = tmp_path / "scores.json"
    assert cli.main(["eval", "--responses", responses, "--prompts", prompts, "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    # strict: no_comma fails, '#' x3 holds, German holds, 2 bullets hold -> 3 of 4 instructions, 2 of 3 prompts
    expected = [satisfied(r["response"], as_constraints([{**{a: b for a, b in k.items() if b is not None}, "type": i}
                                                        for i, k in zip(p["instruction_id_list"], p["kwargs"])]))
                for p, r in zip(PROMPTS, RESPONSES)]
    assert expected == [[False, True], [True], [True]]
    assert metrics["inst_level_strict_acc"] == pytest.approx(3 / 4)
    assert metrics["prompt_level_strict_acc"] == pytest.approx(2 / 3)
    assert metrics["inst_level_strict_acc/language:response_language"] == 1.0
    assert "prompt_level_loose_acc" in capsys.readouterr().out


def test_eval_task_records_with_responses(tmp_path):
    rows = [{"task": "qa", "prompt": "2+2?", "answer": "4", "response": "4"},
            {"task": "qa", "prompt": "capital of France?", "answer": "Paris", "response": "the paris"},
            {"task": "yn", "prompt": "sky blue?", "answer": "yes", "response": "no"}]
    out = tmp_path / "scores.json"
    assert cli.main(["eval", "--responses", _write(tmp_path / "r.jsonl", rows), "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["exact_match"] == pytest.approx(2 / 3) and metrics["exact_match/yn"] == 0.0


@pytest.mark.parametrize("rows,prompts,needle", [
    ([{"prompt": "Write about cats.", "response": 3}], True, r"r.jsonl:1: field 'response' must be a string"),
    ([{"prompt": "Unknown prompt", "response": "x"}], True, r"r.jsonl:1: prompt 'Unknown prompt' is not in --prompts"),
    ([{"prompt": "p", "response": "x"}], False, r"r.jsonl:1: expected IFEval fields"),
    ([{"prompt": "p", "response": "x", "instruction_id_list": ["length_constraints:number_words"],
       "kwargs": [{"relation": "more than", "num_words": 3}]}], False, "kwarg 'relation' must be one of"),
])
def test_bad_response_files_are_one_line_errors(tmp_path, capsys, rows, prompts, needle):
    argv = ["eval", "--responses", _write(tmp_path / "r.jsonl", rows)]
    if prompts:
        argv += ["--prompts", _write(tmp_path / "input_data.jsonl", PROMPTS)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxtune: error: ") and err.count("\n") == 1
    assert re.search(needle, err), err


@pytest.mark.parametrize("argv,needle", [
    (["--harness", "no_such_task", "--hf_dir", "{tmp}", "--output", "{tmp}/r.json", "--harness_include", "{tmp}"],
     "--harness: unknown lm-eval task(s) no_such_task"),
    (["--harness", "x", "--hf_dir", "{tmp}", "--harness_include", "{tmp}/missing", "--output", "o.json"],
     "--harness_include {tmp}/missing: no such directory"),
    (["--harness", "x", "--hf_dir", "{tmp}"], "--hf_dir: pass --output"),
    (["--harness", "x", "--hf_dir", "{tmp}", "--workdir", "{tmp}"], "exactly one of --workdir"),
    (["--harness", "x", "--responses", "{tmp}/r.jsonl"], "--harness runs a model, --responses scores a file"),
    (["--responses", "{tmp}/r.jsonl", "--hf_dir", "{tmp}"], "drop --hf_dir"),
    (["--hf_dir", "{tmp}"], "--workdir is required"),
])
def test_eval_mode_errors_are_one_line(tmp_path, capsys, argv, needle):
    """Checked before any model is loaded (the dirs here hold none)."""
    pytest.importorskip("lm_eval")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxtune: error: ") and needle.replace("{tmp}", str(tmp_path)) in err, err
