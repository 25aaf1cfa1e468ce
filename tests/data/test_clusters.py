"""The built-in task clusters (data.builtin=clusters): answers, held-out clusters never trained on,
template settings, and the config errors a user can trigger."""

import pytest

from jaxtune import validation
from jaxtune.data import datasets
from jaxtune.data.builtin import clusters
from jaxtune.data.templates import render
from jaxtune.errors import UserError
from jaxtune.loading import data_settings


def test_answers_follow_the_operations():
    assert set(clusters.FAMILIES) == {f for c in clusters.CLUSTERS.values() for f in c}
    expected = {
        "reverse_then_uppercase": lambda xs: " ".join(x.upper() for x in xs[::-1]),
        "sort_then_last": max,
        "next_then_reverse": lambda xs: " ".join(clusters.LETTERS[clusters.LETTERS.index(x) + 1] for x in xs[::-1]),
        "previous_digits": lambda xs: " ".join(str(int(x) - 1) for x in xs),
        "sum_digits": lambda xs: str(sum(map(int, xs))),
    }
    for name, answer in expected.items():
        for r in clusters.generate_records([name], 20, seed=3):
            assert r["task"] == name and r["answer"] == answer(r["items"].split()), r


def test_heldout_instructions_reuse_trained_words():
    """A held-out family's wording is built only from trained operations' phrases (plus 'then')."""
    trained = {op for f in clusters.FAMILIES.values() if f.cluster in clusters.TRAIN_CLUSTERS for op in f.operations}
    for c in clusters.HELDOUT_CLUSTERS:
        for name in clusters.CLUSTERS[c]:
            assert set(clusters.FAMILIES[name].operations) <= trained, name
    assert clusters.FAMILIES["reverse_then_uppercase"].wordings()[0] == \
        "Write them backwards, then give them in uppercase"


@pytest.mark.parametrize("k", [1, 6])
@pytest.mark.parametrize("per_task", [0, 1])
def test_sft_data_trains_only_the_chosen_clusters(tmp_path, k, per_task):
    from jaxtune.config import base_config

    c = base_config()
    c.data.builtin = "clusters"
    c.data.clusters = clusters.TRAIN_CLUSTERS[:k]
    c.data.templates_per_task = per_task
    c.data.num_train_examples = 240
    c.data.num_eval_examples = 60
    data = datasets.load_sft_data(data_settings(c), tmp_path, seed=0)
    assert [t.name for t in data.tasks] == list(clusters.TRAIN_CLUSTERS[:k])
    assert data.mixture.mode == "examples_proportional" and abs(sum(data.mixture.rates) - 1) < 1e-9
    trained = {r["task"] for t in data.tasks for r in t.records}
    assert trained == {f for cl in clusters.TRAIN_CLUSTERS[:k] for f in clusters.CLUSTERS[cl]}
    for t in data.tasks:
        for family, spec in t.flan.items():
            assert len(spec.templates) == (1 if per_task else 21)
            assert not set(spec.templates) & set(data.eval_templates[family])  # held-out phrasings only
    evaluated = {r["task"] for r in data.eval_records}
    heldout = {f for cl in clusters.HELDOUT_CLUSTERS for f in clusters.CLUSTERS[cl]}
    assert heldout <= evaluated and not heldout & trained
    assert len(data.eval_templates["reverse_then_uppercase"]) == 24  # an unseen task: every phrasing
    prompt = render(data.eval_templates["reverse_then_uppercase"][0][0], {"items": "a b c"})
    assert all(data.tokenizer.encode(w) for w in prompt.split())


@pytest.mark.parametrize("override, message", [
    ("data.clusters=('compose',)", "held-out clusters are never trained on"),
    ("data.clusters=('transform', 'transform')", "distinct training clusters"),
    ("data.templates_per_task=-1", "data.templates_per_task"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(UserError, match=r"data\.clusters|data\.templates_per_task") as e:
        validation.load_config("configs/flan_clusters.py", [override])
    assert message in str(e.value)


def test_grpo_refuses_the_clusters():
    with pytest.raises(UserError, match=r"not data\.builtin='clusters'"):
        validation.load_config("configs/grpo.py", ["data.builtin=clusters"])
