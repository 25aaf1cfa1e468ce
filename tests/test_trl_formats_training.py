"""Records shaped like TRL's standard datasets train as they are, read from 🤗 dataset folders
(save_to_disk output, `task_config(source='hf')`), with no field mapping: SFT on language-modelling text,
conversational prompt-completion and Capybara/Tulu-3 `messages` (system turn, extra columns); DPO
on explicit-prompt text pairs and ultrafeedback_binarized-style conversations (implicit prompt); KTO
on kto-mix-14k-style unpaired records; a reward model on ultrafeedback_binarized-style pairs.
The spans each format trains are checked in tests/data/test_trl_formats.py."""

import math

import pytest

from jaxtune import cli
from jaxtune.data import chat
from jaxtune.data.tokenizers import train_sentencepiece
from jaxtune.metrics import read_metrics
from tests.helpers import WORDS, reverse_pair, write_config_file

datasets = pytest.importorskip("datasets")

SYSTEM = {"role": "system", "content": "Answer briefly."}


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _shapes(n=24):
    """Records of each TRL shape, built from the reverse-the-words pairs."""
    pairs = [reverse_pair(i) for i in range(n)]
    return {
        "text": [{"text": p["prompt"] + p["chosen"]} for p in pairs],
        "prompt_completion": [{"prompt": [SYSTEM, _user(p["prompt"])], "completion": [_assistant(p["chosen"])]}
                              for p in pairs],
        "tulu": [{"id": f"tulu_{i}", "source": "synthetic", "messages": [SYSTEM, _user(p["prompt"]), _assistant(p["chosen"])]}
                 for i, p in enumerate(pairs)],
        "capybara": [{"source": "synthetic", "messages": [_user(p["prompt"]), _assistant(p["chosen"]),
                                                          _user("again"), _assistant(p["chosen"])]} for p in pairs],
        "explicit": pairs,
        "ultrafeedback": [{"chosen": [_user(p["prompt"]), _assistant(p["chosen"])],
                           "rejected": [_user(p["prompt"]), _assistant(p["rejected"])],
                           "score_chosen": 8.0, "score_rejected": 3.0} for p in pairs],
        "kto_mix": [{"prompt": [_user(p["prompt"])], "completion": [_assistant(p["chosen" if i % 2 else "rejected"])],
                     "label": bool(i % 2)} for i, p in enumerate(pairs)],
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    folders = {}
    for name, rows in _shapes().items():
        folders[name] = str(root / name)
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(folders[name])
    template = chat.resolve_template("chatml")
    texts = [chat.render_chat([_user(reverse_pair(i)["prompt"]), _assistant(reverse_pair(i)["chosen"])], template)
             for i in range(24)] + WORDS + [SYSTEM["content"]]
    train_sentencepiece(texts, root / "spm", vocab_size=300)
    return {"folders": folders, "tokenizer": str(root / "spm.model")}


def _train(data, tmp_path, objective, shapes):
    """A 2-step run of `objective` on one data.tasks entry per shape (each a dataset folder), mixed."""
    settings = [f"c.objective.type = {objective!r}", f"c.data.tokenizer = {data['tokenizer']!r}",
                'c.data.chat_template = "chatml"', "c.data.seq_len = 128", "c.train.steps = 2",
                "c.train.global_batch_size = 8", "c.eval.generative = False"]
    settings += [f"c.data.tasks.{shape} = task_config(source='hf', path={data['folders'][shape]!r}, split='train[:75%]')"
                 for shape in shapes]
    config = write_config_file(tmp_path / "config.py", "", "\n".join(settings),
                               preamble="from jaxtune.config import task_config")
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--workdir", str(workdir)]) == 0
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    return rows


@pytest.mark.slow
def test_sft_trains_text_prompt_completion_capybara_and_tulu_shapes(data, tmp_path, capsys):
    _train(data, tmp_path, "sft", ["text", "prompt_completion", "capybara", "tulu"])
    report = capsys.readouterr().out
    for shape in ("text", "prompt_completion", "capybara", "tulu"):  # every task contributed examples
        assert f"{shape}: 0 examples" not in report and f"{shape}:" in report


@pytest.mark.slow
def test_dpo_trains_explicit_and_implicit_prompt_pairs(data, tmp_path):
    rows = _train(data, tmp_path, "dpo", ["explicit", "ultrafeedback"])
    assert math.isclose(rows[0]["loss"], math.log(2), rel_tol=1e-4)  # policy == reference at step 1


@pytest.mark.slow
def test_kto_trains_kto_mix_shaped_records(data, tmp_path):
    _train(data, tmp_path, "kto", ["kto_mix"])


@pytest.mark.slow
def test_reward_model_trains_on_ultrafeedback_shaped_pairs(data, tmp_path):
    rows = _train(data, tmp_path, "reward", ["ultrafeedback"])
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
