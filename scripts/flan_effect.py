"""FLAN's effect of task diversity, small: held-out-cluster accuracy vs number of training clusters.

    python scripts/flan_effect.py --workdir runs/flan_effect

Trains the same from-scratch model (configs/flan_clusters.py: the quickstart's model) for the same
number of steps on the first K of the six training clusters of jaxtune/data/builtin/clusters.py
(examples-proportional mixing), once with every training template per task ("many") and once with
one ("one"), for several seeds. After training it measures zero-shot greedy exact match on the two
held-out clusters (never trained on in any phrasing) and on held-out phrasings of the trained
families. Writes WORKDIR/results.jsonl (one row per run; a rerun skips finished runs), prints and
writes WORKDIR/results.md (mean +- std over seeds) and draws WORKDIR/flan_effect.png (needs
matplotlib: pip install 'jaxtune[scripts]'). `--tiny` checks the mechanics in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from stage_clock import StageClock

import jaxtune
from jaxtune.data.builtin import clusters

TEMPLATE_SETTINGS = {"many": 0, "one": 1}  # data.templates_per_task
TINY = {"model.num_layers": 1, "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_heads": 2,
        "model.num_kv_heads": 1, "eval.max_new_tokens": 4, "eval.loss": False, "data.num_train_examples": 400}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/flan_effect")
    parser.add_argument("--clusters", default="1,3,6", help="numbers of training clusters K (comma-separated)")
    parser.add_argument("--templates", default="many,one", help="template settings: many (all 21) and/or one")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=220, help="training steps per run (the same for every run)")
    parser.add_argument("--eval-examples", type=int, default=320)
    parser.add_argument("--tiny", action="store_true",
                        help="mechanics only: a 1-layer model, 2 steps, K=1, one seed (seconds, not a result)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.clusters, args.seeds, args.steps, args.eval_examples = "1", 1, 2, 8
    try:
        args.ks = sorted({int(k) for k in args.clusters.split(",")})
    except ValueError:
        parser.error(f"--clusters must be comma-separated integers, got {args.clusters!r}")
    if not args.ks or not all(1 <= k <= len(clusters.TRAIN_CLUSTERS) for k in args.ks):
        parser.error(f"--clusters: each K must be in 1..{len(clusters.TRAIN_CLUSTERS)}, got {args.clusters!r}")
    args.settings = [t for t in args.templates.split(",") if t]
    if not args.settings or any(t not in TEMPLATE_SETTINGS for t in args.settings):
        parser.error(f"--templates must list some of {', '.join(TEMPLATE_SETTINGS)}, got {args.templates!r}")
    if args.seeds < 1 or args.steps < 1 or args.eval_examples < 1:
        parser.error("--seeds, --steps and --eval-examples must be >= 1")
    return args


def scores(eval_after: dict[str, float], trained: tuple[str, ...]) -> dict[str, float]:
    """Per-family exact match averaged per group: each held-out cluster, both together, and the
    held-out phrasings of the trained families."""
    def mean(families):
        values = [eval_after[f"exact_match/{f}"] for f in families if f"exact_match/{f}" in eval_after]
        return float(np.mean(values)) if values else float("nan")

    out = {f"heldout_{c}": mean(clusters.CLUSTERS[c]) for c in clusters.HELDOUT_CLUSTERS}
    out["heldout_clusters"] = mean([f for c in clusters.HELDOUT_CLUSTERS for f in clusters.CLUSTERS[c]])
    out["heldout_phrasings"] = mean([f for c in trained for f in clusters.CLUSTERS[c]])
    return out


def run_one(args, setting: str, k: int, seed: int) -> dict:
    name = f"{setting}_k{k}_seed{seed}"
    config = jaxtune.load_config(
        f"{Path(__file__).resolve().parents[1] / 'configs' / 'flan_clusters.py'}:clusters={k}",
        {"data.templates_per_task": TEMPLATE_SETTINGS[setting], "seed": seed, "train.steps": args.steps,
         "data.num_eval_examples": args.eval_examples, "train.progress_bar": False,
         "train.log_every": max(args.steps // 4, 1), **(TINY if args.tiny else {})})
    with StageClock() as clock:
        summary = jaxtune.train(config, str(Path(args.workdir) / "runs" / name))
    if summary.stopped_early or summary.eval_after is None:  # a signal: the checkpoint resumes on the next call
        raise SystemExit(f"flan_effect: run {name} stopped at step {summary.steps} before its evaluation; "
                         "rerun the same command to resume it")
    trained = clusters.check_clusters(config.data.clusters)
    return {"setting": setting, "k": k, "seed": seed, "steps": summary.steps, **clock.times,
            **scores(summary.eval_after, trained)}


COLUMNS = ("heldout_clusters", "heldout_digits", "heldout_compose", "heldout_phrasings")


def table(rows: list[dict]) -> str:
    lines = ["| templates | K clusters | runs | " + " | ".join(COLUMNS) + " | wall s/run | CPU s/run |",
             "| --- | --- | --- | " + " | ".join("---" for _ in COLUMNS) + " | --- | --- |"]
    for setting in TEMPLATE_SETTINGS:
        for k in sorted({r["k"] for r in rows}):
            group = [r for r in rows if r["setting"] == setting and r["k"] == k]
            if not group:
                continue
            cells = [f"{100 * np.mean([r[c] for r in group]):.1f} ± {100 * np.std([r[c] for r in group]):.1f}"
                     for c in COLUMNS]
            cpu = [r["cpu_s"] for r in group if "cpu_s" in r]  # rows written before CPU time was kept lack it
            lines.append(f"| {setting} | {k} | {len(group)} | " + " | ".join(cells)
                         + f" | {np.mean([r['wall_s'] for r in group]):.0f} | {f'{np.mean(cpu):.0f}' if cpu else '-'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    """FLAN's figure: held-out-cluster accuracy vs K, one line per template setting (mean +- std)."""
    try:
        import matplotlib
    except ImportError:
        print("flan_effect: matplotlib is not installed (pip install 'jaxtune[scripts]'); no figure drawn")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, column, title in ((axes[0], "heldout_clusters", "held-out clusters (zero-shot)"),
                              (axes[1], "heldout_phrasings", "held-out phrasings of trained tasks")):
        for setting, marker in zip(TEMPLATE_SETTINGS, "os"):
            ks = sorted({r["k"] for r in rows if r["setting"] == setting})
            if not ks:
                continue
            values = [[100 * r[column] for r in rows if r["setting"] == setting and r["k"] == k] for k in ks]
            ax.errorbar(ks, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker=marker,
                        capsize=3, label=f"{setting} template{'s' if setting == 'many' else ''} per task")
        ax.set_xlabel("number of training clusters")
        ax.set_ylabel("exact match (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = workdir / "results.jsonl"
    done = {(r["setting"], r["k"], r["seed"], r["steps"]): r for r in map(json.loads, results.open())} \
        if results.exists() else {}
    rows = []
    with StageClock() as invocation:
        for seed in range(args.seeds):
            for k in args.ks:
                for setting in args.settings:
                    key = (setting, k, seed, args.steps)
                    if key not in done:
                        done[key] = run_one(args, setting, k, seed)
                        with results.open("a") as f:
                            f.write(json.dumps(done[key]) + "\n")
                    rows.append(done[key])
                    print(f"flan_effect: {setting} K={k} seed {seed}: held-out clusters "
                          f"{done[key]['heldout_clusters']:.1%}, held-out phrasings "
                          f"{done[key]['heldout_phrasings']:.1%} ({done[key]['wall_s']:.0f} s wall, "
                          f"{done[key].get('cpu_s', float('nan')):.0f} s CPU)")
    text = table(rows)
    (workdir / "results.md").write_text(text + "\n")
    print(f"\nzero-shot exact match (%), mean ± std over {args.seeds} seed(s), {args.steps} steps per run:\n{text}")
    if plot(rows, workdir / "flan_effect.png"):
        print(f"figure: {workdir / 'flan_effect.png'}")
    print(f"this invocation: {invocation.times['wall_s']:.0f} s wall, {invocation.times['cpu_s']:.0f} s CPU "
          "(this process and its children; runs finished by an earlier invocation are not redone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
