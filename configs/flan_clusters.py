"""FLAN's task-cluster experiment at quickstart size: train on some built-in task clusters, test
zero-shot on clusters never trained on (jaxtune/data/builtin/clusters.py).

    jaxtune train --config configs/flan_clusters.py:clusters=3,templates=1 --workdir runs/flan_k3_one

Arguments (comma-separated): `clusters=K` trains the first K of the six training clusters
(transform, select, count, order, shift, arithmetic; default 6), `templates=N` phrases each task
with N training templates (0 = all 21, 1 = FLAN's one-template ablation), `steps=N`. Held-out
exact match is logged per family (`eval/exact_match/<family>`): held-out phrasings of the trained
families, and every phrasing of the held-out clusters' families (digits, compose).
scripts/flan_effect.py sweeps K, the template setting and seeds and draws the figure.
"""

import importlib.util
from pathlib import Path

from jaxtune.config import parse_arg
from jaxtune.data.builtin.clusters import TRAIN_CLUSTERS


def get_config(arg=None):
    args = parse_arg(arg, clusters=len(TRAIN_CLUSTERS), templates=0, steps=0)
    c = _quickstart_config()  # the quickstart's model, optimiser, packing and word dropout
    c.data.builtin = "clusters"
    c.data.clusters = TRAIN_CLUSTERS[: args["clusters"]]
    c.data.templates_per_task = args["templates"]
    c.data.num_train_examples = 100_000
    c.data.num_eval_examples = 320  # spread over the evaluated families (16 each with all six clusters)
    c.train.max_seconds = 0.0  # a fixed step budget: every setting gets the same number of updates
    c.train.checkpoint_every = 10_000
    c.train.keep_checkpoints = 1
    c.eval.show_examples = 0
    c.eval.max_new_tokens = 12
    c.eval.batch_size = 160
    if args["steps"]:
        c.train.steps = args["steps"]
    return c


def _quickstart_config():
    """configs/quickstart.py's config (this file's neighbour, wherever the configs are)."""
    spec = importlib.util.spec_from_file_location("jaxtune_quickstart_config", Path(__file__).with_name("quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
