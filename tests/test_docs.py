"""The docs site: it builds (`mkdocs build --strict`, offline), the commands it marks runnable run,
the extension-point examples it includes (docs/examples/) work, and the README stays a front page.

A fenced block in README.md or docs/**/*.md preceded by the line

    <!-- docs-test: run -->      (or `slow`: only with -m slow; `; before: CMD` runs CMD first)

is executed here, command by command, in a scratch directory that sees the repository's configs/,
scripts/ and docs/ (so relative paths such as runs/x land in the scratch directory). `pip install`
commands are left out: the test runs in the environment they install. A `before:` command must be
shown on the same page. Every `jaxtune train --workdir W` of a block must leave a metrics.jsonl in
W whose last logged loss is below the first.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import models
from jaxtune.data import pipeline, tokenizers
from jaxtune.errors import UserError
from jaxtune.models import attention

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"
MARKER = re.compile(r"^<!-- docs-test: (run|slow)(?:; before: (.+?))? -->\n```\w*\n(.*?)\n```", re.MULTILINE | re.DOTALL)


# ---- the site ---------------------------------------------------------------------------------


def _offline_env(**extra) -> dict[str, str]:
    """The environment with every HTTP(S) request sent to a closed port: a build that fetches fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_MKDOCS_2_WARNING": "1", **extra}
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env[key] = "http://127.0.0.1:9"
    env.pop("NO_PROXY", None), env.pop("no_proxy", None)
    return env


def test_mkdocs_build_strict_offline(tmp_path):
    """Every page, link, anchor, included example and API reference page builds without a warning."""
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                             "-d", str(site)], cwd=REPO, env=_offline_env(), capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    architecture = (site / "architecture" / "index.html").read_text()
    for name in ("class PlainText", "class CsvSource", "def plain_attention", "class IA3"):  # the examples, included whole
        assert name in re.sub(r"<[^>]+>", "", architecture)
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "jaxtune.api.train" in api and "RunSummary" in api  # rendered from the docstrings


def test_readme_is_a_front_page_that_keeps_the_newcomer_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert "pip install -e . && jaxtune train --config configs/quickstart.py --workdir runs/quickstart" in readme
    test_command = 'pip install -e ".[test]" && pytest -n 2'
    assert test_command in readme
    ci_steps = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert any(line.startswith(test_command) for line in ci_steps)  # CI runs the README's command as written
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to a missing file: {target}"


def test_nothing_refers_to_the_old_design_page():
    old = "DESIGN" + ".md"  # spelled apart so this file does not match itself
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    hits = [f for f in files if (REPO / f).is_file() and old in (REPO / f).read_text(errors="ignore")]
    assert not hits, f"{old} is referred to in {hits}; point to docs/architecture.md instead"


# ---- commands the docs mark runnable ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    kind: str
    before: str | None
    body: str


def _marked_blocks() -> list[Block]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    blocks = []
    for page in pages:
        text = page.read_text()
        for kind, before, body in MARKER.findall(text):
            shown = re.sub(r"<!-- docs-test:.*?-->", "", text)
            assert not before or before in shown, f"{page}: the 'before' command {before!r} is not shown on the page"
            blocks.append(Block(str(page.relative_to(REPO)), kind, before or None, body))
    return blocks


def _commands(body: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and `pip install` steps left out."""
    commands = []
    for line in re.sub(r"\s*\\\n\s*", " ", body).splitlines():
        line = line.split("  #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        steps = [s.strip() for s in line.split("&&") if not s.strip().startswith("pip install")]
        if steps:
            commands.append(" && ".join(steps))
    return commands


def _scratch(tmp_path: Path) -> Path:
    for name in ("configs", "scripts", "docs"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def _check_training_learned(command: str, cwd: Path):
    args = shlex.split(command)
    if args[:2] != ["jaxtune", "train"] or "--workdir" not in args:
        return
    rows = [json.loads(line) for line in (cwd / args[args.index("--workdir") + 1] / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) >= 2 and losses[-1] < losses[0], f"{command}: logged losses {losses}"


def _params(kind: str):
    blocks = [b for b in _marked_blocks() if b.kind == kind]
    return [pytest.param(b, id=f"{b.page}[{i}]", marks=[pytest.mark.slow] if kind == "slow" else [])
            for i, b in enumerate(blocks)]


def test_marked_blocks_are_found():
    """The collector sees the runnable blocks (a renamed marker would silently run nothing)."""
    pages = {b.page for b in _marked_blocks()}
    assert {"README.md", "docs/architecture.md", "docs/guides/data.md", "docs/guides/scaling.md"} <= pages
    assert _commands('pip install -e . && jaxtune train --config c.py \\\n  --workdir w  # note') == [
        "jaxtune train --config c.py --workdir w"]


@pytest.mark.parametrize("block", _params("run") + _params("slow"))
def test_documented_commands_run(block, tmp_path):
    cwd = _scratch(tmp_path)
    env = _offline_env(JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the commands run as a user runs them: one CPU device
    commands = ([block.before] if block.before else []) + _commands(block.body)
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800,
                                check=False)
        assert result.returncode == 0, f"{block.page}: `{command}` exited {result.returncode}:\n{result.stderr[-3000:]}"
        assert "jaxtune: error" not in result.stderr
        _check_training_learned(command, cwd)


# ---- the extension-point examples ---------------------------------------------------------------


def _load_example(name: str):
    """An example file as a module (the way `--config docs/examples/x.py` loads it)."""
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def text_objective():
    from jaxtune.objectives import base

    yield _load_example("text_objective")
    base._REGISTRY.pop("text", None)


def _text_run(module, tmp_path, lines, **overrides):
    from jaxtune import objectives, validation

    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = module.get_config(f"train_path={data}")
    validation.apply_overrides(config, [f"{key}={value}" for key, value in overrides.items()])  # selects 'text'
    validation.validate(config)
    objective = objectives.build(config)
    loaded = objective.load_data(tmp_path / "run")
    batches, _ = objective.train_dataset(loaded, batch_size=4, process_index=0, process_count=1)
    return objective, loaded, batches


def test_text_objective_trains_every_token_of_its_records(text_objective, tmp_path):
    """The objective reads {"text"} records: each row is BOS + the text's tokens + EOS, all trained,
    with the batch contract's keys and shapes (what batch_shapes declares)."""
    from jaxtune import objectives

    texts = [json.loads(line)["text"] for line in (EXAMPLES / "text_data.jsonl").read_text().splitlines()]
    objective, loaded, batches = _text_run(text_objective, tmp_path, [{"text": t} for t in texts])
    assert isinstance(objective, text_objective.PlainText) and "text" in objectives.names()
    assert objective.section.text_eos is True and (tmp_path / "run" / "tokenizer.model").is_file()
    batch = next(iter(batches))
    shapes = objective.batch_shapes(4)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s.shape, s.dtype) for k, s in shapes.items()}
    tok = loaded.tokenizer
    seen = set()
    for row in range(4):
        n = int(batch["segment_ids"][row].sum())
        assert batch["loss_mask"][row, :n].all() and not batch["loss_mask"][row, n:].any()
        np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))
        np.testing.assert_array_equal(batch["inputs"][row, 1:n], batch["targets"][row, : n - 1])
        assert batch["inputs"][row, 0] == tok.bos_id
        if n < objective.config.data.seq_len:  # not truncated: the text, then EOS
            assert batch["targets"][row, n - 1] == tok.eos_id
            seen.add(tok.decode(batch["targets"][row, : n - 1]))
    assert seen and seen <= set(texts)

    _, _, no_eos = _text_run(text_objective, tmp_path, [{"text": t} for t in texts], **{"objective.text.text_eos": "false"})
    row = next(iter(no_eos))
    n = int(row["segment_ids"][0].sum())
    assert row["targets"][0, n - 1] != tok.eos_id


def test_text_objective_names_a_bad_record(text_objective, tmp_path):
    """A record without a "text" string stops the run with its file and line (read when the
    tokenizer is trained, before anything compiles)."""
    with pytest.raises(UserError, match=r"texts.jsonl:3: expected a non-empty string field 'text'"):
        _text_run(text_objective, tmp_path, [{"text": "a fine line"}] * 2 + [{"txt": "typo"}])


def _tokenizer(tmp_path, texts):
    return tokenizers.train_sentencepiece(texts * 4, tmp_path / "spm", vocab_size=300)


def test_csv_source_feeds_the_sft_pipeline(tmp_path):
    """CSV rows -> templates -> tokens -> packed batches; only the target (answer) is trained."""
    example = _load_example("csv_source")
    rows = [(f"{a} plus {b}", str(a + b)) for a in range(6) for b in range(4)]
    path = tmp_path / "sums.csv"
    path.write_text("question,answer\n" + "".join(f'"{q}",{a}\n' for q, a in rows))
    source = example.CsvSource(path)
    assert len(source) == len(rows) and source[2] == {"question": rows[2][0], "answer": rows[2][1], "_where": f"{path}:4"}
    tok = _tokenizer(tmp_path, [f"Q: {q} A: {a}" for q, a in rows])
    batches = example.csv_batches(path, [("Q: {question} A:", " {answer}")], tok, seq_len=32, batch_size=4)
    batch = next(iter(batches))
    assert set(batch) == set(pipeline.BATCH_KEYS) and batch["inputs"].shape == (4, 32)
    answers = {a for _, a in rows}
    for row in range(4):
        for segment in set(batch["segment_ids"][row].tolist()) - {0}:
            trained = batch["targets"][row][(batch["segment_ids"][row] == segment) & (batch["loss_mask"][row] == 1)]
            assert tok.decode(trained).strip() in answers  # the answer (+ EOS, not decoded), never the question


def test_csv_source_errors_name_the_file_and_line(tmp_path):
    example = _load_example("csv_source")
    path = tmp_path / "ragged.csv"
    path.write_text("question,answer\nq1,a1\nq2\n")
    with pytest.raises(UserError, match=r"ragged.csv:3: 1 values for 2 columns"):
        example.CsvSource(path)[1]
    with pytest.raises(UserError, match="no such data file"):
        example.CsvSource(tmp_path / "missing.csv")


B, T, H, K, D = 2, 13, 4, 2, 8


@pytest.fixture
def plain(monkeypatch):
    """The example registered under model.attention='plain', as a new implementation is in attention.py."""
    fn = _load_example("plain_attention").plain_attention
    monkeypatch.setattr(attention, "IMPLEMENTATIONS", attention.IMPLEMENTATIONS + ("plain",))
    monkeypatch.setitem(attention._IMPLS, "plain", fn)
    return fn


def _segments():
    seg = np.ones((B, T), np.int32)
    seg[0, :3] = 0  # left padding
    seg[1, 6:] = 2  # two packed sequences, then padding
    seg[1, T - 2:] = 0
    return jnp.asarray(seg)


@pytest.mark.parametrize("case", [{}, {"sliding_window": 4}, {"sliding_window": 4, "is_sliding": False},
                                  {"soft_cap": 1.5, "scale": 0.6}, {"prefix": True}],
                         ids=["packed_left_padded", "sliding", "sliding_off", "soft_cap", "prefix"])
def test_plain_attention_matches_reference(plain, case):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, T, H, D), (B, T, K, D), (B, T, K, D)))
    kw = dict(case, q_segment_ids=_segments())
    if kw.pop("prefix", False):
        kw["prefix"] = tuple(jnp.asarray(rng.standard_normal((3, K, D)), jnp.float32) for _ in range(2))
    if "is_sliding" in kw:
        kw["is_sliding"] = jnp.asarray(kw["is_sliding"])
    got = attention.attend(q, k, v, implementation="plain", **kw)
    want = attention.attend(q, k, v, implementation="reference", **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.slow  # the call-level test above covers these inputs in the default run
def test_plain_attention_runs_a_model(plain):
    """model.attention='plain' in a tiny Llama: the logits equal the reference implementation's."""
    base = models.get_config("llama", "tiny")
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, base.vocab_size, (B, T)), jnp.int32)
    params = jax.jit(models.build(base).init)(jax.random.key(0), tokens[:, :4])["params"]

    def logits(implementation):
        model = models.build(base.replace(attention=implementation))
        return jax.jit(lambda p: model.apply({"params": p}, tokens, segment_ids=_segments()))(params)

    np.testing.assert_allclose(logits("plain"), logits("reference"), atol=1e-4, rtol=1e-4)
