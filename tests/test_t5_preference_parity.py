"""Preference training of an encoder-decoder (T5) against TRL's definitions, step by step.

TRL 1.16's DPOTrainer no longer trains encoder-decoders (`is_encoder_decoder` is gone from it).
Earlier DPOTrainers, and TRL's CPO (SimPO), ORPO and KTO trainers, scored an encoder-decoder pair
like this, transcribed in `trl_encoder_decoder_logps`: the prompts (right-padded) are the encoder
input of both the chosen and the rejected half of one concatenated batch; the completions are the
labels, padded with -100 to one length; the decoder input is the labels shifted right behind the
decoder start token (`model.prepare_decoder_input_ids_from_labels`, -100 -> pad); a sequence's
log-prob is the sum of log p(label) over labels != -100, with no further shift. The losses are
TRL's on those log-probs (`trl_loss`; length-averaged for ipo, dpo_norm, simpo and orpo).

The same random `transformers` T5 v1.1 (fp32) is trained by jaxtune and by torch on jaxtune's
pairs in jaxtune's step order:
- `jaxtune train --config configs/dpo.py:loss=sigmoid,model=t5` with `model.hf_dir` against the
  transcription under torch's AdamW with gradient clipping (TRL's defaults), 4 steps;
- every jaxtune loss_type (and unpaired KTO) with plain SGD, 3 steps, jaxtune's objective losses
  (`pair_losses`) on its encoder-decoder pair log-probs, against the transcription.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import models, objectives, trainer, validation
from jaxtune.data import preference
from jaxtune.data.tokenizers import train_sentencepiece
from jaxtune.metrics import read_metrics
from jaxtune.objectives import pairs
from jaxtune.trainer.step import make_apply_fn
from tests.helpers import WORDS, reverse_pair, write_preference_jsonl

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
t5_reference = pytest.importorskip("tests.models.t5_reference")

pytestmark = pytest.mark.slow

PAIRS, SEQ = 8, 32
SETTINGS = {
    "data.seq_len": SEQ, "train.global_batch_size": PAIRS, "train.log_every": 1, "train.checkpoint_every": 100,
    "train.progress_bar": False, "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.b2": 0.999,
    "optim.weight_decay": 0.0, "optim.clip_norm": 1.0, "mesh.rules": "dp", "model.dtype": "float32",
    "model.param_dtype": "float32",
}
METRICS = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected")


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """Pairs (and unpaired KTO records), a tokenizer, and a random tiny T5 v1.1 saved as an HF directory."""
    root = tmp_path_factory.mktemp("t5pref")
    texts = [reverse_pair(i)[k] for i in range(48) for k in ("prompt", "chosen")] + WORDS
    tokenizer = train_sentencepiece(texts, root / "spm", vocab_size=300)
    assert tokenizer.pad_id == 0  # T5's decoder start token is its pad id, in jaxtune and transformers
    model = t5_reference.hf_model("t5-v1.1", vocab_size=tokenizer.vocab_size, num_layers=2, num_decoder_layers=2,
                                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=tokenizer.eos_id)
    model.save_pretrained(root / "hf")
    # transformers 5 writes tie_word_embeddings=true for this config, though the checkpoint's own lm_head
    # unties it when transformers loads it; say what the checkpoint holds (as Flan-T5's config.json does)
    hf_config = json.loads((root / "hf" / "config.json").read_text())
    (root / "hf" / "config.json").write_text(json.dumps({**hf_config, "tie_word_embeddings": False}))
    return {"pairs": str(write_preference_jsonl(root / "pairs.jsonl", 48)),
            "unpaired": str(write_preference_jsonl(root / "unpaired.jsonl", 48, unpaired=True)),
            "tokenizer": str(root / "spm.model"), "hf": str(root / "hf"), "pad": tokenizer.pad_id}


def _config(files, loss, **overrides):
    values = {**SETTINGS, "data.train_path": files["unpaired" if loss == "kto" else "pairs"],
              "data.tokenizer": files["tokenizer"], "model.hf_dir": files["hf"], **overrides}
    return validation.load_config(f"configs/dpo.py:loss={loss},model=t5", [f"{k}={v}" for k, v in values.items()])


def _batches(config, steps):
    """jaxtune's padded pair batches in step order, and each pair as token lists
    (prompt, completion 0, completion 1): what TRL's tokenized columns hold."""
    objective = objectives.build(config)
    data = objective.load_data(str(config.model.hf_dir) + "/..")
    it = iter(objective.train_dataset(data, batch_size=PAIRS, process_index=0, process_count=1)[0])
    out = []
    for _ in range(steps):
        batch = next(it)
        lists = []
        for p in range(PAIRS):
            n = int(batch["segment_ids"][p, 0].sum())
            assert (batch["inputs"][p, 0] == batch["inputs"][p, 1]).all()
            lists.append([batch["inputs"][p, 0, :n].tolist()] + [
                batch["targets"][p, side, :int(batch["loss_mask"][p, side].sum())].tolist() for side in range(2)])
        out.append((batch, lists))
    return out


def _pad(rows, value):
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def trl_encoder_decoder_logps(model, pairs_, pad_id):
    """(summed log-probs, label counts), each [2, P] (chosen row 0), as TRL's concatenated_forward
    computed them for an encoder-decoder (module docstring)."""
    prompts = _pad([p for p, _, _ in pairs_] * 2, pad_id)
    labels = _pad([c for _, c, _ in pairs_] + [r for _, _, r in pairs_], -100)
    out = model(input_ids=prompts, attention_mask=(prompts != pad_id).long(),
                decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels), use_cache=False)
    mask = labels != -100
    logp = torch.log_softmax(out.logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(-1).view(2, -1), mask.sum(-1).view(2, -1).float()


BETA = {"sigmoid": 0.1, "robust": 0.1, "hinge": 0.1, "ipo": 0.1, "dpo_norm": 5.0, "simpo": 2.0, "orpo": 0.1,
        "kto_pair": 0.1, "kto": 0.1}
SMOOTHING = {"robust": 0.1}
AVERAGED = ("ipo", "dpo_norm", "simpo", "orpo")
# Steps of about the same size for every loss: IPO's squared loss and dpo_norm's beta of 5 have far
# larger gradients than DPO's (at 0.5 IPO diverges and float32 rounding grows step after step).
SGD_LR = {"ipo": 0.01, "dpo_norm": 0.05}


def _means(chosen_rewards, rejected_rewards, logps, chosen=None):
    """The logged metrics: batch means (KTO: chosen = the desirable examples, rejected = the others)."""
    if chosen is None:
        return {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
                "logps/chosen": logps[0].mean().item(), "logps/rejected": logps[1].mean().item()}
    return {"rewards/chosen": chosen_rewards[chosen].mean().item(), "rewards/rejected": chosen_rewards[~chosen].mean().item(),
            "logps/chosen": logps[0][chosen].mean().item(), "logps/rejected": logps[0][~chosen].mean().item()}


def trl_loss(loss_type, logps, lengths, ref, labels=None):
    """(loss, metrics) as TRL defines each loss (DPOTrainer.dpo_loss, CPO's simpo, ORPO's odds
    ratio, KTOTrainer), on [2, P] summed log-probs; `labels` (KTO): desirable or not."""
    beta, ls = BETA[loss_type], SMOOTHING.get(loss_type, 0.0)
    summed = logps.detach()
    if loss_type in AVERAGED:
        logps, ref = logps / lengths, ref / lengths
    (c, r), (c0, r0) = logps, ref
    sig = torch.nn.functional.logsigmoid
    if loss_type == "simpo":  # gamma 1.0
        return -sig(beta * (c - r - 1.0 / beta)).mean(), _means(beta * c.detach(), beta * r.detach(), summed)
    if loss_type == "orpo":
        log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
        return (-c - beta * sig(log_odds)).mean(), _means(beta * c.detach(), beta * r.detach(), summed)
    if loss_type == "kto":  # row 0: the completion, row 1: the prompt with a mismatched completion (the KL row)
        kl = (r - r0).mean().clamp(min=0).detach()
        ratio = c - c0
        losses = torch.where(labels, 1 - torch.sigmoid(beta * (ratio - kl)), 1 - torch.sigmoid(beta * (kl - ratio)))
        return losses.mean(), {"kl": kl.item(), **_means(beta * ratio.detach(), None, summed, chosen=labels)}
    logits = (c - r) - (c0 - r0)
    if loss_type in ("sigmoid", "dpo_norm"):
        losses = -sig(beta * logits) * (1 - ls) - sig(-beta * logits) * ls
    elif loss_type == "robust":
        losses = (-sig(beta * logits) * (1 - ls) + sig(-beta * logits) * ls) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:  # kto_pair; its reference points carry no gradient (as in the KTO paper and KTOTrainer)
        chosen_kl = (c - c0).mean().clamp(min=0).detach()
        rejected_kl = (r - r0).mean().clamp(min=0).detach()
        losses = torch.cat([1 - torch.sigmoid(beta * ((c - c0) - rejected_kl)),
                            1 - torch.sigmoid(beta * (chosen_kl - (r - r0)))])
    return losses.mean(), _means(beta * (c - c0).detach(), beta * (r - r0).detach(), summed)


def _torch_steps(files, loss_type, steps, make_optimizer, clip=None):
    """Per-step loss and metrics (`trl_loss`) of the transcription, training with `make_optimizer`."""
    model = transformers.T5ForConditionalGeneration.from_pretrained(files["hf"], dtype=torch.float32).eval()
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model.parameters())
    out = []
    for batch, lists in steps:
        logps, lengths = trl_encoder_decoder_logps(model, lists, files["pad"])
        with torch.no_grad():
            ref = trl_encoder_decoder_logps(reference, lists, files["pad"])[0]
        labels = torch.tensor(batch.get(preference.LABEL_KEY, np.zeros(PAIRS)) > 0)
        loss, metrics = trl_loss(loss_type, logps, lengths, ref, labels)
        optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        out.append({"loss": loss.item(), **metrics})
    return out


def _report(name, ours, theirs, keys):
    """The largest per-step differences (seen with pytest -s): the parity figures."""
    worst = {k: max(abs(a[k] - b[k]) / max(1.0, abs(b[k])) for a, b in zip(ours, theirs)) for k in keys}
    print(f"{name}: max |diff| / max(1, |TRL|) per metric over {len(theirs)} steps: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def test_t5_dpo_follows_trl_encoder_decoder_dpo_step_by_step(run_files, tmp_path):
    """`jaxtune train` (configs/dpo.py:model=t5, a frozen reference copy, AdamW, clipping) against the
    transcription of TRL's encoder-decoder DPO under torch's AdamW."""
    steps, lr = 4, 1e-3
    config = _config(run_files, "sigmoid", **{"train.steps": steps, "optim.lr": lr})
    assert objectives.build(config).reference_kind() == "copy"
    trainer.train(config, tmp_path / "run", devices=jax.devices()[:2])
    ours = {r["step"]: r for r in read_metrics(tmp_path / "run") if "loss" in r}
    theirs = _torch_steps(run_files, "sigmoid", _batches(config, steps),
                          lambda p: torch.optim.AdamW(p, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), clip=1.0)
    assert sorted(ours) == list(range(1, steps + 1))
    _report("sigmoid (jaxtune train, AdamW)", [ours[k] for k in sorted(ours)], theirs, METRICS)
    for step, expected in enumerate(theirs, 1):
        for key in METRICS:
            assert ours[step][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), (step, key)
    assert theirs[-1]["loss"] < theirs[0]["loss"] - 1e-3  # it trained: the comparison is not of constants


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "dpo_norm", "simpo", "orpo", "kto_pair",
                                       "kto"])
def test_every_t5_preference_loss_follows_trl_under_sgd(run_files, loss_type, fwd_and_grads):
    """jaxtune's objective losses on its encoder-decoder pair log-probs, plain SGD, against TRL's."""
    n_steps, lr = 3, SGD_LR.get(loss_type, 0.5)
    config = _config(run_files, loss_type, **({"objective.dpo.label_smoothing": SMOOTHING[loss_type]}
                                              if loss_type in SMOOTHING else {}))
    objective = objectives.build(config)
    steps = _batches(config, n_steps)
    forward, grads_of = fwd_and_grads
    params = ref_params = jax.device_get(models.from_pretrained(run_files["hf"], dtype="float32")[1])
    ours = []
    for batch, _ in steps:
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        logps, lengths = forward(params, batch)
        ref = forward(ref_params, batch)[0] if objective.reference_kind() != "none" else jnp.zeros_like(logps)

        def loss_of(logps, lengths=lengths, ref=ref, batch=batch):
            losses, metrics = objective.pair_losses(logps, lengths, ref, batch)
            return jnp.mean(losses), metrics

        (loss, metrics), cotangent = jax.value_and_grad(loss_of, has_aux=True)(logps)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads_of(params, batch, cotangent))
        ours.append({"loss": float(loss), **{k: float(v) for k, v in metrics.items()}})
    theirs = _torch_steps(run_files, loss_type, steps, lambda p: torch.optim.SGD(p, lr=lr))
    compared = METRICS + (("kl",) if loss_type == "kto" else ())
    _report(loss_type + " (SGD)", ours, theirs, compared)
    for step, (mine, expected) in enumerate(zip(ours, theirs), 1):
        for key in compared:
            assert mine[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), (loss_type, step, key)
    assert abs(theirs[-1]["loss"] - theirs[0]["loss"]) > 1e-4  # it trained


@pytest.fixture(scope="module")
def fwd_and_grads(run_files):
    """Jitted once for every loss: pair log-probs [P, 2] of a padded pair batch (the trainer's
    encoder-decoder ModelFns), and the parameter gradient of <cotangent, log-probs>."""
    model = models.from_pretrained(run_files["hf"], dtype="float32")[0]
    fns = make_apply_fn(model, logits_chunk=8)

    @jax.jit
    def forward(params, batch):
        return pairs.pair_scores(fns, params, batch)

    @jax.jit
    def grads_of(params, batch, cotangent):
        return jax.grad(lambda p: jnp.sum(pairs.pair_scores(fns, p, batch)[0] * cotangent))(params)

    return forward, grads_of
