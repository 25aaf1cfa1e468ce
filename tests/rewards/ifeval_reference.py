"""Google's IFEval scorer as lm-evaluation-harness ships it (`lm_eval.tasks.ifeval`), for parity tests.

lm-eval's module downloads punkt_tab at import when NLTK cannot find it, so the tables are
installed into a local NLTK data dir first (`ifeval_checkers.install_punkt_tab`): nothing is
downloaded. langdetect is seeded the same way for both sides (it is one global setting)."""

from __future__ import annotations

import functools

from jaxtune.rewards import ifeval_checkers


@functools.cache
def reference(nltk_root: str):
    import nltk

    ifeval_checkers.install_punkt_tab(nltk_root)
    if nltk_root not in nltk.data.path:
        nltk.data.path.insert(0, nltk_root)
    from lm_eval.tasks.ifeval import utils

    return utils


def verdicts(utils, record: dict, response: str) -> tuple[list[bool], list[bool]]:
    """(strict, loose) per instruction, from lm-eval's own `test_instruction_following_*`."""
    import langdetect

    langdetect.DetectorFactory.seed = ifeval_checkers.LANGDETECT_SEED
    example = utils.InputExample(key=record.get("key", 0), instruction_id_list=record["instruction_id_list"],
                                 prompt=record["prompt"], kwargs=record["kwargs"])
    strict = utils.test_instruction_following_strict(example, response).follow_instruction_list
    loose = utils.test_instruction_following_loose(example, response).follow_instruction_list
    return strict, loose
