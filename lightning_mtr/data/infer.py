"""``lightning-mtr schema infer``: a first schema from the data files, with the reason for each choice.

One streaming pass (:mod:`~lightning_mtr.data.profile`) sums up every column; then each column
becomes a sparse feature (ids: text, or whole numbers unless the name or its siblings say a
measure), a dense one (fractions, counts), or a task (the ``--label`` columns). The YAML it
writes loads with ``Schema.from_yaml`` and trains as it is; its comments say why, so a user can
edit what the files could not tell.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from lightning_mtr.data.encode import DataError
from lightning_mtr.data.profile import ColumnProfile, Profiles, profile_files
from lightning_mtr.data.reader import TextFormat, list_files

HEADROOM = 1.3  # rows per id seen: later ids (the next day's, the validation split's) find rows too
HASH_HEADROOM = 4  # hashed ids: with 4 rows per id, about 1 id in 5 shares its row (1 - e^(-1/4))
NEW_ID_RATE = 0.01  # above this share of values seen once, ids are still arriving: open-ended
SMALL_TABLE = 1024  # integer ids below this get a row per value whatever their spread
MAX_ROWS = 2**22  # larger id spaces get this many rows and managed collisions
CHAIN_TOLERANCE = 0.01  # a later label may be 1 without the earlier on this share of its positives (Ali-CCP)
MIN_POSITIVES = 10  # a 0/1 column with fewer positives is not called a funnel step: chance could place them
# words that make a whole-number column a measure (dense), not an id; matched against name tokens
MEASURE_WORDS = frozenset("count cnt num number numerical duration timestamp ts price amount age wage gains "
                          "losses dividends weeks hours seconds length len score rate ratio dense value".split())


@dataclass(frozen=True)
class Choice:
    """One schema entry: ``section`` (``sparse``, ``dense``, ``skip``), its YAML mapping, and why."""

    section: str
    entry: dict
    why: str


def infer(profiles: Profiles, sparse: Sequence[str] = (), dense: Sequence[str] = (),
          ignore: Sequence[str] = ()) -> tuple[list[Choice], list[Choice]]:
    """``(feature choices, task choices)``; ``sparse``/``dense``/``ignore`` are name globs that
    override the guess."""
    tasks = infer_tasks(profiles)
    families = _families(profiles)
    features = []
    for column in profiles.columns.values():
        if column.name in profiles.labels:
            continue
        if _matches(column, ignore):
            features.append(Choice("skip", {"name": column.name}, "ignored (--ignore)"))
            continue
        step = _funnel_step(profiles, column)
        if step is not None:
            features.append(Choice("skip", {"name": column.name}, f"0/1 and 1 only where {step} is 1: a later step "
                                   f"of the funnel, so a label, not an input (--label {column.name} to train it)"))
            continue
        wanted = "sparse" if _matches(column, sparse) else "dense" if _matches(column, dense) else None
        features.append(_feature(column, wanted or _guess(column, families), forced=wanted is not None))
    return features, tasks


def _funnel_step(profiles: Profiles, column: ColumnProfile) -> str | None:
    """The label whose positives hold all of this 0/1 column's (at least ``MIN_POSITIVES``), if one does."""
    if not _is_binary(column) or column.mean * column.count < MIN_POSITIVES:
        return None
    return next((label for label in profiles.labels
                 if profiles.outside.get((label, column.name)) == 0 and profiles.columns[label].mean < 1), None)


def _matches(column: ColumnProfile, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(column.name, g) for g in globs)


def _guess(column: ColumnProfile, families: dict[str, str]) -> str:
    """``sparse``, ``dense`` or ``skip``; ``families`` maps a name stem (``I`` of Criteo's ``I1``..``I13``)
    to the kind most of its columns have on their own."""
    if column.kind in ("string", "list"):
        return "sparse"
    if column.kind == "bool" or (column.kind == "float" and not column.integral):
        return "dense"
    if column.kind not in ("int", "float") or column.count == 0:
        return "skip"
    if column.kind == "float":  # whole numbers, but ids are read as integers or text only
        return "dense"
    stem = _stem(column.name)
    if stem in families:
        return families[stem]
    return "dense" if _tokens(column.name) & MEASURE_WORDS else "sparse"


def _families(profiles: Profiles) -> dict[str, str]:
    """Stems shared by 3+ columns whose types decide (text: sparse; fractions: dense), by majority."""
    votes: dict[str, Counter] = {}
    for column in profiles.columns.values():
        decided = "sparse" if column.kind == "string" else "dense" if column.kind == "float" else None
        votes.setdefault(_stem(column.name), Counter())[decided] += 1
    return {stem: max(("sparse", "dense"), key=lambda k: count[k]) for stem, count in votes.items()
            if stem and sum(count.values()) >= 3 and count["sparse"] != count["dense"]}


def _stem(name: str) -> str:
    return re.sub(r"[\d_]+$", "", name)


def _tokens(name: str) -> set[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower()
    return set(re.split(r"[^a-z]+", spaced)) - {""}


def _feature(column: ColumnProfile, kind: str, forced: bool) -> Choice:
    seen = f"{_count(column)} in {column.rows:,} rows"
    if kind == "skip":
        return Choice("skip", {"name": column.name}, f"not a feature: {column.kind} values, {column.count} numbers")
    entry = {"name": _identifier(column.name)}
    if entry["name"] != column.name:
        entry["column"] = column.name
    if kind == "dense":
        return _dense(column, entry, forced)
    rows, how = _table(column)
    entry["num_embeddings"] = rows
    entry["embedding_dim"] = _dim(rows)
    entry.update(how)
    lists = ""
    if column.kind == "list":
        entry["multi_valued"] = True
        lists = f"; lists of up to {column.max_length} (max_length keeps the first N)"
    return Choice("sparse", entry, f"{seen} -> {rows:,} rows {_reason(column, how, rows)}{lists}"
                  + (" (--sparse)" if forced else ""))


def _table(column: ColumnProfile) -> tuple[int, dict]:
    """Rows and how ids find them: text and negative ids are hashed; non-negative integer ids get a
    row per value (a later, larger id folds in by modulo) when few and no longer arriving, else
    managed collisions (each id its own row while rows last; an id first seen at evaluation, whose
    row was never trained anyway, shares the table's last row)."""
    distinct = max(column.distinct, 1)
    if column.kind != "int" or column.low < 0:
        return min(_pow2(distinct * HASH_HEADROOM), MAX_ROWS), {"hashed": True}
    span = int(column.high) + 1
    if column.new_rate <= NEW_ID_RATE and span <= max(SMALL_TABLE, 4 * distinct * HEADROOM):
        return min(_pow2(span * HEADROOM), MAX_ROWS), {"out_of_range": "modulo"}
    return min(_pow2(distinct * HEADROOM), MAX_ROWS), {"managed_collisions": {}}


def _reason(column: ColumnProfile, how: dict, rows: int) -> str:
    capped = f" (capped at {MAX_ROWS:,})" if rows == MAX_ROWS else ""
    if "hashed" in how:
        text = column.kind == "string" or not column.count  # a list of text has no numbers: no lowest id
        what = "text ids" if text else f"ids from {column.low:.0f}"
        return f"x{HASH_HEADROOM} headroom, hashed ({what}; about 1 id in 5 shares a row){capped}"
    if "out_of_range" in how:
        return f"(ids 0..{column.high:.0f} x{HEADROOM} headroom; a larger id folds in by modulo){capped}"
    arriving = (f"{column.new_rate:.1%} of values are ids seen once, so new ids keep arriving" if column.exact
                else "too many to count")
    return (f"x{HEADROOM} headroom; ids up to {column.high:,.0f}, {arriving}: managed collisions give each "
            f"its own row while rows last{capped}")


def _dense(column: ColumnProfile, entry: dict, forced: bool) -> Choice:
    """The transform from the value distribution: none for values already in [0, 1] or constant,
    log1p for a long right tail of non-negative values (counts), else standardisation."""
    shape = f"{column.low:.4g}..{column.high:.4g}, mean {column.mean:.4g}, skew {column.skew:.2f}"
    if column.low == column.high:
        transform, why = "none", f"constant {column.low:.4g} in these files: drop it unless later data varies"
    elif column.low >= 0 and column.high <= 1:
        transform, why = "none", f"already in [0, 1] ({shape})"
    elif column.low >= -1 and column.skew > 2:  # log1p reads max(x, 0): a -1 for "none" (Criteo) is a 0
        transform, why = "log1p_standardize", f"long right tail ({shape})"
    else:
        transform, why = "standardize", shape
    entry["transform"] = transform
    if column.nulls:
        entry["fill_missing"] = 0.0
        why += f"; {column.nulls:,} missing (null or NaN) -> 0"
    return Choice("dense", entry, why + (" (--dense)" if forced else ""))


def infer_tasks(profiles: Profiles) -> list[Choice]:
    """A task per label, binary for 0/1 values, else regression. A chain (``b`` is 1 only where
    ``a`` is, up to ``CHAIN_TOLERANCE``) gives ESMM's three tasks: ``ctr`` (``a``), ``cvr`` (``b`` on
    ``a == 1``) and ``ctcvr`` (``a * b``), which MMoE trains as they are and ESMM/ESM2 weight themselves."""
    columns = profiles.columns
    binary = [label for label in profiles.labels if _is_binary(columns[label])]
    chain = next(((a, b) for i, a in enumerate(binary) for b in binary[i + 1:] if _is_chain(profiles, a, b)), None)
    tasks = []
    for label in profiles.labels:
        column, ref = columns[label], _reference(label)
        if chain and label == chain[0]:
            tasks.append(Choice("task", {"name": "ctr", "label": ref}, f"0/1 in {column.rows:,} rows, "
                                f"{_rate(column)} positive; {chain[1]} follows it"))
        elif chain and label == chain[1]:
            a, outside = chain[0], profiles.outside[chain]
            note = f"; {outside} rows have {label} without {a}: ctcvr negatives, outside cvr's space" if outside else ""
            tasks.append(Choice("task", {"name": "cvr", "label": ref, "sample_space": f"{_reference(a)} == 1"},
                                f"{label} happens only after {a}{note} (ESMM, ESM2 set this weight to 0 themselves)"))
            tasks.append(Choice("task", {"name": "ctcvr", "label": f"{_reference(a)} * {ref}"},
                                f"{a} and {label} over all rows (ESMM's entire-space task)"))
        elif label in binary:
            tasks.append(Choice("task", {"name": _identifier(label), "label": ref},
                                f"0/1 in {column.rows:,} rows, {_rate(column)} positive"))
        else:
            tasks.append(Choice("task", {"name": _identifier(label), "label": ref, "kind": "regression"},
                                f"{_count(column)} values {column.low:.4g}..{column.high:.4g}: not 0/1"))
    return tasks


def _is_binary(column: ColumnProfile) -> bool:
    return column.integral and column.low >= 0 and column.high <= 1 and column.count > 0


def _is_chain(profiles: Profiles, a: str, b: str) -> bool:
    positives = profiles.columns[b].mean * profiles.columns[b].count
    return positives > 0 and profiles.outside[a, b] <= CHAIN_TOLERANCE * positives


def _rate(column: ColumnProfile) -> str:
    return f"{column.mean:.2%}"


def _count(column: ColumnProfile) -> str:
    return f"{column.distinct:,} distinct" if column.exact else f"about {column.distinct:,} distinct"


def _reference(column: str) -> str:
    """A column in a label expression: backticks unless it is a Python identifier."""
    return column if column.isidentifier() else f"`{column}`"


def _identifier(column: str) -> str:
    """A feature or task name for the column (metric names and YAML keys read better without spaces)."""
    name = re.sub(r"\W+", "_", column).strip("_")
    return name or column


def _pow2(value: float) -> int:
    return 1 << max(math.ceil(math.log2(max(value, 2))), 1)


def _dim(rows: int) -> int:
    """A power of two at most ``6 * rows ** 0.25`` and above half of it (Google's rule of thumb), from 4 to 64."""
    return min(64, max(4, _pow2(6 * rows**0.25) // 2))


def render(profiles: Profiles, features: list[Choice], tasks: list[Choice]) -> str:
    """The schema as commented YAML."""
    rows = max((c.rows for c in profiles.columns.values()), default=0)
    lines = [f"# Inferred by `lightning-mtr schema infer` from {rows:,} rows of {len(profiles.files)} file(s):",
             *(f"#   {path}" for path in profiles.files[:5]), *(["#   ..."] if len(profiles.files) > 5 else []),
             "# A proposal: check each comment's reason, edit what the files could not tell",
             "# (docs/schema-and-data.md: every key).", "sparse:"]
    lines += _section(features, "sparse") or ["  []"]
    lines += ["dense:", *(_section(features, "dense") or ["  []"]), "tasks:", *_section(tasks, "task")]
    skipped = [c for c in features if c.section == "skip"]
    if skipped:
        lines += ["# not used:", *(f"#   {c.entry['name']}: {c.why}" for c in skipped)]
    return "\n".join(lines) + "\n"


def _section(choices: list[Choice], section: str) -> list[str]:
    return [f"  - {_flow(c.entry)}  # {c.why}" for c in choices if c.section == section]


def _flow(entry: dict) -> str:
    """A one-line YAML mapping; names that YAML would read as numbers (``109_14``) are quoted."""
    return yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=10**6).strip()


def main(argv: list[str]) -> int:
    """Propose a commented schema from Parquet/CSV files: `schema infer --data FILES --label COL [--out F]`."""
    parser = argparse.ArgumentParser(prog="lightning-mtr schema", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("infer", help="propose a schema from Parquet/CSV files")
    sub.add_argument("--data", nargs="+", default=[], help="files or directories (all splits, for table sizes)")
    sub.add_argument("--label", action="append", default=[], help="a label column (repeat, earlier steps first)")
    sub.add_argument("--out", help="write the schema here (default: print it)")
    for kind in ("sparse", "dense", "ignore"):
        sub.add_argument(f"--{kind}", action="append", default=[], metavar="GLOB",
                         help=f"columns to make {kind} features" if kind != "ignore" else "columns to leave out")
    sub.add_argument("--delimiter", default=",", help="field separator of text files (\\t: a tab)")
    sub.add_argument("--column-names", help="comma-separated names, for text files without a header row")
    args = parser.parse_args(argv)
    try:
        if not args.label:
            raise DataError("name the label columns: --label click --label conversion (earlier funnel steps first)")
        text = TextFormat(args.delimiter, tuple(args.column_names.split(",")) if args.column_names else None)
        profiles = profile_files(list_files(args.data) if args.data else [], args.label, text)
        features, tasks = infer(profiles, args.sparse, args.dense, args.ignore)
        schema = render(profiles, features, tasks)
    except DataError as error:
        print(f"lightning-mtr schema: error: {error}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(schema)
        print(f"wrote {args.out}: {sum(c.section == 'sparse' for c in features)} sparse and "
              f"{sum(c.section == 'dense' for c in features)} dense features, {len(tasks)} tasks", file=sys.stderr)
    else:
        sys.stdout.write(schema)
    return 0
