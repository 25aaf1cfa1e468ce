"""Quickstart: a small Llama-style model learns 10 instruction families from scratch on a CPU.

    jaxtune train --config configs/quickstart.py --workdir runs/quickstart

Procedurally generated FLAN-style tasks (jaxtune/data/builtin/quickstart.py): 11 families, each
phrased by 21 training templates; 3 further templates per family (unseen combinations of a
shared frame and a family wording) are held out, and greedy exact match on them is measured
before and after training. A 512-piece sentencepiece tokenizer is trained on first use and
cached in the workdir. About 4 minutes on 2 CPU cores.

The encoder-decoder variant trains a tiny T5 (v1.1 / Flan-T5 architecture) on the same tasks, the
prompt fed to the encoder and the answer to the decoder, packed T5X-style (docs/guides/t5.md):

    jaxtune train --config configs/quickstart.py:model=t5 --workdir runs/quickstart-t5
"""

from jaxtune.config import base_config, parse_arg


def get_config(arg=None):
    c = base_config()
    c.model.family = "llama"
    c.model.variant = "tiny"
    c.model.hidden_size = 128
    c.model.intermediate_size = 384
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.tie_word_embeddings = True
    c.model.max_position_embeddings = 512

    c.data.builtin = "quickstart"
    c.data.seq_len = 128
    c.data.packing = True
    c.data.word_dropout = 0.15  # drop instruction words: generalise to unseen phrasings
    c.data.tokenizer_vocab_size = 512
    c.data.num_train_examples = 200_000
    c.data.num_eval_examples = 300

    c.train.steps = 900
    c.train.global_batch_size = 16  # ~135 packed examples per step: more updates beat bigger batches here
    c.train.log_every = 25
    c.train.checkpoint_every = 300
    # Time budget: on a slower machine stop early (checkpoint + final eval) to stay under 5 minutes.
    c.train.max_seconds = 270.0

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.05

    c.mesh.rules = "dp"
    c.eval.max_new_tokens = 10
    c.eval.batch_size = 150

    args = parse_arg(arg, steps=c.train.steps, model="llama")  # configs/quickstart.py:steps=100,model=t5
    c.train.steps = args["steps"]
    if args["model"] == "t5":
        _t5(c)
    elif args["model"] != "llama":
        raise ValueError(f"configs/quickstart.py: model={args['model']!r}; expected llama or t5")
    return c


def _t5(c):
    """A T5 v1.1-shaped encoder-decoder of about the decoder-only model's size: 3 encoder and 3
    decoder layers of width 128 (gated-GELU MLP, untied head)."""
    c.model.family = "t5"
    c.model.variant = "tiny-v1.1"
    c.model.num_layers = 3
    c.model.head_dim = 32
    c.model.intermediate_size = 256
    c.model.num_kv_heads = None
    c.model.tie_word_embeddings = None
    c.model.max_position_embeddings = None
