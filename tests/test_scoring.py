"""`rewards(prompts, completions)`: a reward model as a Python function scores exactly what the
reward objective trains on (the pipeline's pair rows, whole sequence, last non-pad token)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import models, sharding
from jaxtune.data import preference
from jaxtune.data.tokenizers import train_sentencepiece
from jaxtune.errors import UserError
from jaxtune.objectives.reward_model import RewardRows, pair_rewards
from jaxtune.scoring import RewardScorer
from tests.helpers import WORDS, reverse_pair

SEQ_LEN = 24
TEMPLATES = (("Q: {prompt}", " {response}"),)


@pytest.fixture(scope="module")
def scorer_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    pairs = [reverse_pair(i) for i in range(6)]
    texts = [p[k] for p in pairs for k in ("prompt", "chosen")] + WORDS
    tokenizer = train_sentencepiece(texts, root / "spm", vocab_size=300)
    config = models.get_config("llama", "tiny", vocab_size=tokenizer.vocab_size, num_labels=1,
                               pad_token_id=tokenizer.pad_id)
    model = models.build(config)
    params = sharding.unbox(model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"])
    return pairs, tokenizer, model, {"params": params}


@pytest.mark.slow  # the default run checks the same through a trained run (tests/test_reward_training.py)
def test_rewards_equal_the_training_rows_rewards(scorer_setup):
    pairs, tokenizer, model, variables = scorer_setup
    transform = RewardRows(preference.PreferenceTransform(
        pairs, {"default": list(TEMPLATES)}, tokenizer, seq_len=SEQ_LEN, truncation="truncate", seed=0), tokenizer.pad_id)
    rows = [transform(i, p) for i, p in enumerate(pairs)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in ("inputs", "positions", "segment_ids", "score_index")}
    apply = lambda p, tokens, positions, segment_ids, frozen=None, rngs=None: model.apply(
        p, tokens, positions=positions, segment_ids=segment_ids)
    trained = np.asarray(pair_rewards(apply, variables, batch))

    scorer = RewardScorer(model, variables, tokenizer, seq_len=SEQ_LEN, templates=TEMPLATES, batch_size=4)
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer(prompts, [p["chosen"] for p in pairs], answer=["unused"] * len(pairs))
    rejected = scorer(prompts, [p["rejected"] for p in pairs])
    assert len(chosen) == len(pairs) and all(isinstance(x, float) for x in chosen)
    np.testing.assert_allclose(np.stack([chosen, rejected], axis=1), trained, atol=1e-5)
    assert np.ptp(trained) > 1e-3


@pytest.mark.slow
def test_rewards_reject_bad_arguments_and_non_reward_models(scorer_setup):
    _, tokenizer, model, variables = scorer_setup
    scorer = RewardScorer(model, variables, tokenizer, seq_len=SEQ_LEN)
    with pytest.raises(UserError, match="2 prompts but 1 completions"):
        scorer(["a", "b"], ["c"])
    with pytest.raises(UserError, match="lists of strings"):
        scorer("a", "b")
    lm = models.build(model.config.replace(num_labels=None))
    with pytest.raises(UserError, match="not a reward model"):
        RewardScorer(lm, variables, tokenizer, seq_len=SEQ_LEN)
