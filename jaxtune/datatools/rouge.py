"""ROUGE-L F-measure (Google's `rouge-score` package) and the "too similar to the pool" check.

Self-Instruct keeps a new instruction only when its ROUGE-L F-measure against every instruction
already in the pool is below 0.7; Evol-Instruct's "no information gain" check compares an evolved
instruction with its parent the same way. ROUGE-L F is the harmonic mean of LCS/len(a) and
LCS/len(b), where LCS is the longest common subsequence of the two token lists; it is symmetric.

Tokenisation (`WordTokenizer`, passed to rouge-score's `RougeScorer`): the text is NFKC-normalised
and lower-cased; a token is a run of letters/digits (any script; `_` and punctuation separate
tokens), except that each character of a script written without spaces (CJK ideographs, kana,
Thai, Lao, Khmer, Myanmar) is a token of its own. No stemming, as in the Self-Instruct code. On
ASCII text this gives exactly rouge-score's default tokens; the default tokenizer itself keeps
only [a-z0-9] and so would score two Chinese or Russian sentences as empty (0.0), or "café" and
"cafe" as the same word.

`RougePool` tokenises each pool text once and bounds the score by the bag-of-words overlap
(LCS <= shared tokens counted with multiplicity) before running the LCS dynamic programme, so a
candidate is compared with a large pool quickly; the LCS itself is rouge-score's (`_score_lcs`,
the function the Self-Instruct reference code calls on pre-tokenised text).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from rouge_score import rouge_scorer, tokenizers

SELF_INSTRUCT_THRESHOLD = 0.7  # Wang et al. 2023: kept when ROUGE-L < 0.7 against every pool instruction

# Scripts written without spaces between words: one token per character.
_UNSPACED = ("\u0e00-\u0eff"  # Thai, Lao
             "\u1000-\u109f"  # Myanmar
             "\u1780-\u17ff"  # Khmer
             "\u3040-\u30ff\u31f0-\u31ff"  # Hiragana, Katakana
             "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
             "\U00020000-\U0003134f")
_TOKEN = re.compile(f"[{_UNSPACED}]|[^\\W_{_UNSPACED}]+")


class WordTokenizer(tokenizers.Tokenizer):
    """Unicode-aware word tokens (see the module docstring); rouge-score's default on ASCII text."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


TOKENIZER = WordTokenizer()
_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=TOKENIZER)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts (0.0 when either has no tokens)."""
    return _SCORER.score(a, b)["rougeL"].fmeasure


@dataclasses.dataclass(frozen=True)
class Match:
    score: float  # the highest ROUGE-L F against the pool (0.0 for an empty pool)
    index: int  # the pool text it was reached with (-1 for an empty pool)


class RougePool:
    """Texts to compare candidates with; `add` grows it (e.g. with each accepted instruction)."""

    def __init__(self, texts: Iterable[str] = ()):
        self.texts: list[str] = []
        self._tokens: list[list[str]] = []
        self._bags: list[Counter] = []
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> int:
        """Adds `text`; returns its index."""
        tokens = TOKENIZER.tokenize(text)
        self.texts.append(text)
        self._tokens.append(tokens)
        self._bags.append(Counter(tokens))
        return len(self.texts) - 1

    def truncate(self, size: int) -> None:
        """Keeps the first `size` texts (undoes tentative `add`s)."""
        del self.texts[size:], self._tokens[size:], self._bags[size:]

    def max_similarity(self, text: str) -> Match:
        """The pool text most similar to `text` (the first one on ties) and its ROUGE-L F."""
        tokens = TOKENIZER.tokenize(text)
        bag = Counter(tokens)
        best = Match(0.0, -1 if not self.texts else 0)
        for index, (other, other_bag) in enumerate(zip(self._tokens, self._bags)):
            total = len(tokens) + len(other)
            if not total:
                continue
            shared = sum((bag & other_bag).values())
            if 2 * shared / total <= best.score:  # F <= 2*LCS/(m+n) <= 2*shared/(m+n): cannot beat the best
                continue
            score = rouge_scorer._score_lcs(other, tokens).fmeasure
            if score > best.score:
                best = Match(score, index)
        return best

    def max_similarities(self, texts: Sequence[str]) -> list[Match]:
        """`max_similarity` of each text against the pool as it is (the texts are not added)."""
        return [self.max_similarity(t) for t in texts]

    def add_if_novel(self, text: str, threshold: float = SELF_INSTRUCT_THRESHOLD) -> tuple[bool, Match]:
        """Adds `text` when its max similarity is below `threshold`; returns (added, the match)."""
        match = self.max_similarity(text)
        if match.score < threshold:
            self.add(text)
            return True, match
        return False, match
