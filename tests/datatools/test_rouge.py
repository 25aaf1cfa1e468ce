"""ROUGE-L F against hand-computed LCS values, the tokenizer's unicode handling, and the pool."""

import random

import pytest
from rouge_score import rouge_scorer

from jaxtune.datatools.rouge import TOKENIZER, RougePool, rouge_l


def _f(lcs: int, m: int, n: int) -> float:
    p, r = lcs / n, lcs / m
    return 2 * p * r / (p + r) if lcs else 0.0


@pytest.mark.parametrize("a, b, expected", [
    # LCS "the cat on the mat" = 5 of 6 tokens each.
    ("The cat sat on the mat.", "the cat lay on the mat", _f(5, 6, 6)),
    # LCS "a c" = 2; lengths 4 and 3: P = 2/3, R = 2/4 -> F = 4/7.
    ("a b c d", "a c e", 4 / 7),
    # Order matters: LCS of "x y z" and "z y x" is 1 -> F = 1/3.
    ("x y z", "z y x", 1 / 3),
    # Identical after lower-casing and punctuation; disjoint; empty.
    ("Write a poem!", "write a poem", 1.0),
    ("alpha beta", "gamma delta", 0.0),
    ("", "anything here", 0.0),
    # Unicode: each CJK character is a token (LCS 我爱 = 2 of 3); Cyrillic words; accents kept.
    ("我爱猫", "我爱狗", 2 / 3),
    ("Привет, мир", "привет мир друзья", _f(2, 2, 3)),
    ("café au lait", "cafe au lait", 2 / 3),
])
def test_rouge_l_matches_hand_computed(a, b, expected):
    assert rouge_l(a, b) == pytest.approx(expected)
    assert rouge_l(b, a) == pytest.approx(expected)  # F-measure is symmetric


def test_tokenizer_equals_rouge_score_default_on_ascii_and_keeps_unicode():
    default = rouge_scorer.RougeScorer(["rougeL"])
    for a, b in [("Hello, World! snake_case 42", "hello world snake case 4 2"), ("It's A-OK.", "its a ok")]:
        assert TOKENIZER.tokenize(a) == default._tokenizer.tokenize(a)
        assert rouge_l(a, b) == pytest.approx(default.score(a, b)["rougeL"].fmeasure)
    assert TOKENIZER.tokenize("Übersetze ins 日本語 bitte") == ["übersetze", "ins", "日", "本", "語", "bitte"]
    assert default._tokenizer.tokenize("日本語") == []  # why the default tokenizer is not used


def test_pool_max_similarity_equals_brute_force():
    rng = random.Random(0)
    words = "a b c d e f g h".split()
    pool_texts = [" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(60)]
    pool = RougePool(pool_texts)
    for _ in range(30):
        candidate = " ".join(rng.choices(words, k=rng.randint(1, 8)))
        scores = [rouge_l(t, candidate) for t in pool_texts]
        match = pool.max_similarity(candidate)
        assert match.score == pytest.approx(max(scores)) and scores[match.index] == pytest.approx(max(scores))
    assert RougePool().max_similarity("x").index == -1


def test_pool_add_if_novel_uses_the_threshold():
    pool = RougePool(["the cat sat on the mat"])
    added, match = pool.add_if_novel("the cat lay on the mat")  # 5/6 >= 0.7
    assert not added and match.score == pytest.approx(5 / 6) and len(pool) == 1
    added, _ = pool.add_if_novel("the cat lay on the mat", threshold=0.9)
    assert added and len(pool) == 2
    pool.truncate(1)
    assert pool.texts == ["the cat sat on the mat"]
