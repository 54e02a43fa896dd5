"""README is the first day's page and docs/ the reference (issue 12): README stays under a line
budget, every relative link in README and docs/ reaches a file (and a heading, where it names one),
every page of docs/ is linked from README, the repository files they name exist, README's map
lists the distributed package, and README's "Train on your own data" commands train as written.
docs/multi-gpu.md's commands are checked in tests/test_docs_multigpu.py, the torch-only Python
block of README's "Export and serve" in tests/test_serving_cli.py."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_mtr.cli import main
from lightning_mtr.schema import Schema

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
# What a new user reads on the first day; the reference lives in docs/. Room is left for a
# paragraph or two, not for a section: a new section of reference belongs in docs/.
README_LINE_BUDGET = 225


def _prose(text: str) -> str:
    """Markdown without its fenced code blocks (a ``# comment`` in a block is not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces -> -."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", _prose(page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text()))


def test_readme_stays_within_its_line_budget():
    lines = len(README.read_text().splitlines())
    assert lines <= README_LINE_BUDGET, (
        f"README.md has {lines} lines, over its budget of {README_LINE_BUDGET}: move reference material "
        f"into docs/ (schema and data, models, serving, multi-GPU, kernels, benchmarks) and link it")


# where a command of README or docs/ writes: --out, predict's output_dir, consolidate's file
OUTPUTS = tuple(rf"{command}[ =]([^\s\]`)]+)" for command in
                (r"--out", r"--prediction_writer\.output_dir", r"lightning-mtr consolidate \S+"))


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_every_output_path_the_docs_suggest_is_git_ignored():
    """``synth --out data/``, ``mmoe.parquet``, ``single.ckpt``, ``scores/``, ... stay out of
    ``git status``; placeholders (DIR, OUT) are not paths. The package's own ``data/`` is not ignored,
    nor is a schema ``schema infer --out`` writes: the user edits and keeps it, as any config."""
    suggested = {path.rstrip("/") + ("/x" if path.endswith("/") else "")
                 for page in PAGES for pattern in OUTPUTS for path in re.findall(pattern, page.read_text())
                 if not path.isupper() and not path.startswith(("<", "$", "/"))  # /tmp/...: not in the repository
                 and not path.endswith(".yaml")}
    assert {"data/x", "mmoe.parquet", "single.ckpt", "scores/x"} <= suggested, suggested
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--", *sorted(suggested),
                              "lightning_mtr/data/new_module.py"], cwd=REPO, capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(suggested), ignored.stdout


def test_docs_exist_and_every_page_is_linked_from_readme():
    assert DOCS, "docs/ holds no pages"
    linked = {(README.parent / link.split("#")[0]).resolve() for link in _links(README)}
    unlinked = [page.name for page in DOCS if page.resolve() not in linked]
    assert not unlinked, f"README.md links no docs/ page named {unlinked}: add it to the Documentation list"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.name})")
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_named_repository_files_exist(page):
    named = set(re.findall(r"`((?:conf|lightning_mtr|tests|tools)/[\w/.]+\.(?:py|yaml|cpp|sh))`", page.read_text()))
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"{page.relative_to(REPO)} names files that do not exist: {missing}"


def test_layout_lists_the_distributed_package():
    text = README.read_text()
    block = text[text.index("    distributed/"):]
    block = block[:re.search(r"^\S", block, re.M).start()]  # up to the tree's next top-level entry
    listed = set(re.findall(r"^\s+(\w+\.py)\s", block, re.M))
    present = {p.name for p in (REPO / "lightning_mtr/training/distributed").glob("*.py")} - {"__init__.py"}
    assert listed == present


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _write_log(schema: Schema, path: Path, rows: int, rng: np.random.Generator) -> None:
    """A log with every column the schema reads: managed ids of any size, other ids in range, dense
    values with a long right tail, and 0/1 labels where conversion follows a click."""
    columns = {f.source_column: rng.integers(0, 10**9 if f.managed_collisions else f.num_embeddings, rows)
               for f in schema.sparse}
    columns |= {f.source_column: rng.lognormal(2.0, 1.0, rows) for f in schema.dense}
    columns |= {"click": rng.integers(0, 2, rows)}
    columns |= {"conversion": columns["click"] * rng.integers(0, 2, rows)}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _lookup(feature) -> str:
    return "managed" if feature.managed_collisions else feature.out_of_range


def test_readme_own_data_commands_train_as_written(tmp_path, monkeypatch):
    """The section's commands as written, in a directory holding copies of the configs, on a tiny log
    with the example schema's columns: ``schema infer`` proposes the example (kinds, lookups, tasks;
    the example adds ``side``), and the example saved where ``fit`` reads it trains MMoE, and ESMM with
    the config the section names, unedited."""
    section = _section("Train on your own data")
    (schema_block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    infer, fit = [shlex.split(line) for line in re.sub(r"\\\n\s*", "", block).strip().splitlines()]
    assert infer[:3] == ["lightning-mtr", "schema", "infer"] and fit[:2] == ["lightning-mtr", "fit"]
    option = dict(zip(fit[2::2], fit[3::2], strict=True))
    schema_path = tmp_path / option["--data.schema"]
    schema_path.parent.mkdir(parents=True)
    schema_path.write_text(schema_block)
    example = Schema.from_yaml(schema_path)
    rng = np.random.default_rng(0)
    for split, rows in (("train", 1200), ("val", 300), ("test", 300)):
        target = tmp_path / option[f"--data.{split}"]
        _write_log(example, target / "part-0.parquet" if option[f"--data.{split}"].endswith("/") else target,
                   rows, rng)
    esmm = re.search(r"`--config (conf/models/\w+\.yaml)` trains ESMM", section)[1]
    for config in (option["--config"], esmm):
        (tmp_path / config).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / config, tmp_path / config)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-mtr"])  # LightningCLI warns when args and argv both exist

    assert main(infer[1:]) == 0
    inferred = Schema.from_yaml(schema_path)
    assert {f.name: _lookup(f) for f in inferred.sparse} == {f.name: _lookup(f) for f in example.sparse}
    assert {f.name: f.transform for f in inferred.dense} == {f.name: f.transform for f in example.dense}
    assert [(t.name, t.label, t.sample_space) for t in inferred.tasks] == \
        [(t.name, t.label, t.sample_space) for t in example.tasks]

    schema_path.write_text(schema_block)  # the user's edit
    assert main(fit[1:]) == 0
    assert main([esmm if arg == option["--config"] else arg for arg in fit[1:]]) == 0
    assert len(list((tmp_path / "runs").rglob("last.ckpt"))) == 2, "each run writes its checkpoint"
