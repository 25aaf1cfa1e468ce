"""Evaluation metrics: generative exact match with standard answer normalisation."""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower-case, no punctuation/articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_scores(
    predictions: Sequence[str], references: Sequence[str], tasks: Sequence[str] | None = None
) -> dict[str, float]:
    """`exact_match` over everything plus `exact_match/<task>` per task, each in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hits = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]
    scores = {"exact_match": sum(hits) / max(len(hits), 1)}
    if tasks is not None:
        per_task: dict[str, list[bool]] = defaultdict(list)
        for task, hit in zip(tasks, hits):
            per_task[task].append(hit)
        for task, task_hits in sorted(per_task.items()):
            scores[f"exact_match/{task}"] = sum(task_hits) / len(task_hits)
    return scores
