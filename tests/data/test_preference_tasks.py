"""Preference pairs and KTO records on the shared pipeline: data.tasks, mixtures, templates, packing, held-out pairs."""

import json
from collections import Counter

import pytest

from jaxtune import config as config_lib, loading
from jaxtune import validation
from jaxtune.data import datasets, pair_packing, preference
from jaxtune.data.tokenizers import load_tokenizer, train_sentencepiece
from jaxtune.errors import UserError
from tests.helpers import WORDS, reverse_pair, write_preference_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref_tasks")
    # A task whose columns need a field mapping and a FLAN template: {"question", "good", "bad"}.
    with (root / "renamed.jsonl").open("w") as f:
        for i in range(40):
            pair = reverse_pair(i)
            f.write(json.dumps({"question": pair["prompt"], "good": pair["chosen"], "bad": pair["rejected"]}) + "\n")
    chat = write_preference_jsonl(root / "chat.jsonl", 20, chat=True)  # chat messages and text
    kto = write_preference_jsonl(root / "kto.jsonl", 30, unpaired=True)
    held_out = write_preference_jsonl(root / "held_out.jsonl", 9, start=500)
    texts = [reverse_pair(i)[k] for i in range(40) for k in ("prompt", "chosen")] + WORDS + ["Question Answer"]
    train_sentencepiece(texts, root / "spm", vocab_size=300)
    return {"renamed": root / "renamed.jsonl", "chat": chat, "kto": kto, "held_out": held_out,
            "tokenizer": str(root / "spm.model")}


def _config(files, **data):
    c = config_lib.base_config()
    c.data.tokenizer = files["tokenizer"]
    c.data.seq_len = 40
    c.data.chat_template = "chatml"
    c.objective.type = "preference"
    c.data.tasks.renamed = config_lib.task_config(path=str(files["renamed"]), weight=3.0,
                                                  fields={"prompt": "question", "chosen": "good", "rejected": "bad"},
                                                  templates=(("Question: {prompt}", " Answer:{response}"),))
    c.data.tasks.chat = config_lib.task_config(path=str(files["chat"]), format="chat", weight=1.0)
    c.data.mixture.mode = "weights"
    for key, value in data.items():
        c.data[key] = value
    return c


def _decode(tokenizer, ids):
    return tokenizer.decode([int(i) for i in ids if i > 2])


def test_pair_tasks_mix_at_their_weights_with_their_templates(files, tmp_path):
    c = _config(files, packing=False)
    data = datasets.load_preference_data(loading.data_settings(c), tmp_path, unpaired=False)
    assert [t.name for t in data.tasks] == ["chat", "renamed"] and data.mixture.rates == pytest.approx((0.25, 0.75))
    it, stats = datasets.preference_train_dataset(data, c.data, batch_size=8, seed=0, unpaired=False)
    it = iter(it)
    batches = [next(it) for _ in range(6)]
    assert batches[0]["inputs"].shape == (8, 2, 40)
    counts = {name: s.examples for name, s in stats.pipeline.tasks.items()}
    assert counts["renamed"] + counts["chat"] == 48 and counts["renamed"] == pytest.approx(36, abs=2)
    tok = load_tokenizer(files["tokenizer"])
    prompts = Counter()
    for b in batches:
        for row in range(8):
            text = _decode(tok, b["inputs"][row, 0][b["segment_ids"][row, 0] > 0])
            prompts["flan" if text.startswith("Question: reverse") and " Answer:" in text else
                    "chat" if "<|im_start|>assistant" in text else "text" if text.startswith("reverse:") else "other"] += 1
    # The chat task holds chat messages (its chat template) and text records (the default template).
    assert prompts["flan"] == counts["renamed"] and prompts["chat"] + prompts["text"] == counts["chat"]
    assert prompts["chat"] > 0 and prompts["other"] == 0


def test_kto_records_through_data_tasks_with_a_temperature_mixture(files, tmp_path):
    c = _config(files, packing=False)
    c.data.tasks = {"kto": config_lib.task_config(path=str(files["kto"])),
                    "kto_small": config_lib.task_config(path=str(files["kto"]), cap=10)}
    c.data.mixture.mode, c.data.mixture.temperature = "temperature", 2.0
    data = datasets.load_preference_data(loading.data_settings(c), tmp_path, unpaired=True)
    assert data.mixture.rates == pytest.approx((30 ** 0.5 / (30 ** 0.5 + 10 ** 0.5), 10 ** 0.5 / (30 ** 0.5 + 10 ** 0.5)))
    batch = next(iter(datasets.preference_train_dataset(data, c.data, batch_size=4, seed=0, unpaired=True)[0]))
    assert batch[preference.LABEL_KEY].shape == (4,) and set(batch[preference.LABEL_KEY].tolist()) <= {0, 1}


def test_packed_pair_batches_from_the_tasks(files, tmp_path):
    c = _config(files, packing=True, max_pairs_per_row=5, seq_len=96)
    c.data.pair_batching = "rows"  # the row budget (the default, "pairs", is tests/objectives/test_packed_steps.py's)
    data = datasets.load_preference_data(loading.data_settings(c), tmp_path, unpaired=False)
    it, stats = datasets.preference_train_dataset(data, c.data, batch_size=4, seed=0, unpaired=False)
    batch = next(iter(it))
    assert batch["inputs"].shape == (4, 192) and batch[pair_packing.PAIR_MASK_KEY].shape == (4, 5)
    assert batch[preference.INDEX_KEY].shape == (4, 5)
    pairs = int(batch[pair_packing.PAIR_MASK_KEY].sum())
    assert pairs > 4  # more than one pair per row on average: the point of packing
    # Every filled slot has its chosen (odd) and rejected (even) segment in its row.
    for r in range(4):
        ids = set(batch["segment_ids"][r].tolist()) - {0}
        assert ids == set(range(1, 2 * int(batch[pair_packing.PAIR_MASK_KEY][r].sum()) + 1))
    assert stats.pipeline.packing_efficiency > 0.5


def test_held_out_pairs_from_eval_path_and_eval_tasks(files, tmp_path):
    c = _config(files)
    c.data.eval_path = str(files["held_out"])
    c.eval.tasks.heldout_chat = config_lib.eval_task_config("preference", path=str(files["chat"]), format="chat",
                                                            max_examples=5)
    data = datasets.load_preference_data(loading.data_settings(c), tmp_path, unpaired=False, eval_cfg=c.eval)
    sets = datasets.preference_eval_sets(data, c.data, c.eval, seed=0, unpaired=False)
    assert [(s.name, len(s.arrays["inputs"])) for s in sets] == [("", 9), ("heldout_chat", 5)]
    assert sets[0].arrays["inputs"].shape == (9, 2, 40)
    assert sets[0].arrays[preference.INDEX_KEY].tolist() == list(range(9))  # source order


@pytest.mark.parametrize("setting,message", [
    ({"format": "alpaca"}, "data.tasks.renamed.format' is 'alpaca'"),
    ({"chat_template": "no-such-template.jinja"}, "data.tasks.renamed.chat_template"),
])
def test_bad_pair_task_settings_name_the_key(files, tmp_path, setting, message):
    c = _config(files)
    c.data.tasks.renamed.update(setting)
    with pytest.raises(UserError, match=message):
        datasets.load_preference_data(loading.data_settings(c), tmp_path, unpaired=False)


def test_preference_eval_task_needs_a_pair_objective(files):
    c = _config(files)
    c.objective.type = "sft"
    c.data.chat_template = ""
    c.eval.tasks.pairs = config_lib.eval_task_config("preference", path=str(files["held_out"]))
    with pytest.raises(UserError, match="eval.tasks.pairs.metric' is 'preference'"):
        validation.validate(c)


def test_a_task_whose_pairs_never_fit_stops_with_an_error(files, tmp_path):
    c = _config(files, packing=False, truncation="drop", seq_len=4)
    c.data.tasks = {"renamed": c.data.tasks.renamed}
    data = datasets.load_preference_data(loading.data_settings(c), tmp_path, unpaired=False)
    it, _ = datasets.preference_train_dataset(data, c.data, batch_size=2, seed=0, unpaired=False)
    with pytest.raises(UserError, match="task 'renamed': the last 1001 preference records were all skipped or dropped"):
        next(iter(it))
