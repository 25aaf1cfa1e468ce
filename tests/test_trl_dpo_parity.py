"""DPO against TRL's DPOTrainer, step by step: the same tiny Hugging Face model, the same pairs in
the same order, the same hyperparameters (TRL's defaults: sigmoid loss, beta 0.1, a frozen
reference copy, AdamW, gradient clipping at 1). jaxtune's padded run and its packed run
(data.packing with data.pair_batching='pairs': the same pairs per step in fewer rows) must both
follow TRL's per-step loss and log-probs.

TRL is given jaxtune's own token ids (its tokenization of text differs, and is not what is
compared) in jaxtune's step order, read sequentially.
"""

import jax
import numpy as np
import pytest

from jaxtune import objectives, trainer, validation
from jaxtune.data import preference
from jaxtune.data.tokenizers import train_sentencepiece
from jaxtune.metrics import read_metrics
from tests.helpers import WORDS, reverse_pair, write_preference_jsonl

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.slow

STEPS, PAIRS, SEQ, LR = 4, 8, 48, 1e-3
SETTINGS = {
    "data.seq_len": SEQ, "data.templates": "(('{prompt}', '{response}'),)", "train.steps": STEPS,
    "train.global_batch_size": PAIRS, "train.log_every": 1, "train.checkpoint_every": 100,
    "train.progress_bar": False, "optim.lr": LR, "optim.schedule": "constant", "optim.warmup_steps": 0,
    "optim.b2": 0.999, "optim.weight_decay": 0.0, "optim.clip_norm": 1.0, "mesh.rules": "dp", "mesh.data": 2,
    "model.dtype": "float32", "model.param_dtype": "float32", "objective.dpo.reference": "copy",
}
COMPARED = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected")  # TRL's metric names


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """Pairs, a tokenizer, and a random tiny Llama saved as a Hugging Face directory."""
    root = tmp_path_factory.mktemp("trl")
    pairs = write_preference_jsonl(root / "pairs.jsonl", 48)
    texts = [reverse_pair(i)[k] for i in range(48) for k in ("prompt", "chosen")] + WORDS
    tokenizer = train_sentencepiece(texts, root / "spm", vocab_size=300)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False,
                                      attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "hf")
    return {"pairs": str(pairs), "tokenizer": str(root / "spm.model"), "hf": str(root / "hf"),
            "pad": tokenizer.pad_id or 0}


def _config(files, **overrides):
    values = {**SETTINGS, "data.train_path": files["pairs"], "data.tokenizer": files["tokenizer"],
              "model.hf_dir": files["hf"], **overrides}
    return validation.load_config("configs/dpo.py:loss=sigmoid", [f"{k}={v}" for k, v in values.items()])


def _jaxtune(files, workdir, **overrides):
    trainer.train(_config(files, **overrides), workdir, devices=jax.devices()[:2])
    return {r["step"]: r for r in read_metrics(workdir) if "loss" in r}


def _trl_examples(files) -> list[dict]:
    """The pairs jaxtune's (padded) steps hold, in step order, as TRL's tokenized columns."""
    config = _config(files, **{"data.packing": False})
    objective = objectives.build(config)
    data = objective.load_data(files["hf"] + "/..")
    it, _ = objective.train_dataset(data, batch_size=PAIRS, process_index=0, process_count=1)
    batches = iter(it)
    examples = []
    for _ in range(STEPS):
        batch = next(batches)
        for pair in range(PAIRS):
            sequences = []
            for side in range(2):
                n = int(batch["segment_ids"][pair, side].sum())
                tokens = list(batch["inputs"][pair, side, :n]) + [int(batch["targets"][pair, side, n - 1])]
                prompt = int(np.argmax(batch["loss_mask"][pair, side])) + 1
                sequences.append(([int(t) for t in tokens[:prompt]], [int(t) for t in tokens[prompt:]]))
            assert sequences[0][0] == sequences[1][0]
            examples.append({"prompt_ids": sequences[0][0], "chosen_ids": sequences[0][1],
                             "rejected_ids": sequences[1][1], preference.INDEX_KEY: int(batch[preference.INDEX_KEY][pair])})
    return examples


class _InOrder(trl.DPOTrainer):
    """DPOTrainer on already tokenized pairs, read in the given order."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _trl(files, tmp_path) -> dict[int, dict]:
    examples = _trl_examples(files)
    model = transformers.AutoModelForCausalLM.from_pretrained(files["hf"], dtype=torch.float32)
    # TRL reads only the pad id from its tokenizer here (the pairs come tokenized): jaxtune's
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": files["pad"], "<unk>": 1},
                                                                          unk_token="<unk>")),
        pad_token="<pad>", eos_token="<pad>")
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=PAIRS, max_steps=STEPS, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.999, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, beta=0.1, report_to=[], use_cpu=True, save_strategy="no", max_length=None, seed=0,
        remove_unused_columns=False, dataloader_drop_last=True)
    dpo = _InOrder(model=model, args=args, train_dataset=datasets.Dataset.from_list(examples),
                   processing_class=tokenizer)
    dpo.train()
    rows = [r for r in dpo.state.log_history if "loss" in r and "step" in r]
    return {r["step"]: r for r in rows}


def test_padded_and_packed_dpo_follow_trl_dpo_trainer_step_by_step(run_files, tmp_path):
    reference = _trl(run_files, tmp_path)
    padded = _jaxtune(run_files, tmp_path / "padded", **{"data.packing": False})
    packed = _jaxtune(run_files, tmp_path / "packed", **{"data.packing": True, "data.max_pairs_per_row": 4})
    assert sorted(reference) == sorted(padded) == sorted(packed) == list(range(1, STEPS + 1))
    for step, theirs in reference.items():
        for ours in (padded[step], packed[step]):
            assert ours["loss"] == pytest.approx(theirs["loss"], abs=2e-4), step
            for key in ("logps/chosen", "logps/rejected"):  # float32 forwards: ~1e-5 apart at step 1
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4), (step, key)
            for key in ("rewards/chosen", "rewards/rejected"):  # beta x a difference of two such log-probs
                assert ours[key] == pytest.approx(theirs[key], abs=3e-4), (step, key)
        for key in ("loss",) + COMPARED:  # packed and padded: the same pairs, the same arithmetic
            assert packed[step][key] == pytest.approx(padded[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert reference[STEPS]["loss"] < reference[1]["loss"]  # it trained: the comparison is not of constants
