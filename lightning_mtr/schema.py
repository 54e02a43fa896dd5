"""The data schema: the single source of truth for features, tables, tasks and sample spaces.

One YAML file declares it (see ``conf/schemas/``); the data pipeline, the embedding
tables, the model heads, the losses and the metrics are all built from the same
:class:`Schema` object, so they cannot disagree.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from lightning_mtr.derived import derive_rows, read_vocab_file, validate_derived
from lightning_mtr.expressions import Expression

Pooling = Literal["sum", "mean"]
TaskKind = Literal["binary", "regression", "multiclass", "ranking"]
TASK_KINDS = ("binary", "regression", "multiclass", "ranking")
RankingLoss = Literal["pairwise", "listwise", "pointwise"]
RANKING_LOSS_NAMES = get_args(RankingLoss)
DenseTransform = Literal["none", "standardize", "log1p", "log1p_standardize"]
OutOfRange = Literal["error", "modulo"]
EvictionPolicy = Literal["lfu", "lru", "distance_lfu"]
EVICTION_POLICIES = get_args(EvictionPolicy)
ID_SPACE = 2**63 - 1  # a managed table's raw ids (and hashed strings) lie in [0, ID_SPACE)


@dataclass(frozen=True)
class ManagedCollisions:
    """Zero-collision hashing for an open-ended id space (TorchRec's ``MCHManagedCollisionModule``).

    Raw ids of any size get a row of their own while rows are free; once the table is full, the
    ``eviction_policy`` picks which ids keep theirs, every ``eviction_interval`` training steps
    (``lfu``: the most frequent since they entered; ``lru``: the most recent; ``distance_lfu``, the
    default: frequency decayed by age with ``decay_exponent``; on the drifting daily log with tables
    smaller than the live ids, only it beat plain hashing on CTR every day, docs/daily.md). Ids waiting for
    a row, and unseen ids at evaluation, share the table's last row.
    """

    eviction_policy: EvictionPolicy = "distance_lfu"
    eviction_interval: int = 1
    decay_exponent: float = 1.0
Side = Literal["user", "item"]
SIDES = get_args(Side)


@dataclass(frozen=True)
class SparseFeature:
    """A categorical feature looked up in an embedding table.

    Integer ids must lie in ``[0, num_embeddings)`` unless ``out_of_range: modulo``;
    string ids are always hashed into ``num_embeddings`` buckets, and ``hashed: true`` hashes
    every id as a string: needed for text ids in CSV files, where a column whose values all
    look like numbers (hex ``12345678``) would otherwise be read as integers in one file and
    as strings in another. Features naming the same
    ``table`` share it (and must agree on its size, dim and pooling). A null value is a
    missing feature: an empty bag, whose pooled embedding is zero.

    ``sequence: true`` marks an ordered list (a behaviour sequence) that the model reads
    unpooled, one embedding per element (TorchRec's ``EmbeddingCollection``); ``max_length``
    then keeps its first elements, so write the most recent behaviour first. Its column may
    also hold single ids (a sequence of one, or none when null): how a candidate item shares
    the history's tables. A table is pooled or not, so sequence features share tables only
    with each other, and they share one ``embedding_dim`` (an ``EmbeddingCollection`` requires it).

    ``side`` says what the feature describes: ``user`` (the request: the user, their behaviours,
    the query, the context; the default) or ``item`` (the candidate being scored). Models that
    build a representation once per request and score many candidates (DUPN), and a user/item
    tower split, read the item side only where the candidate enters.

    ``managed_collisions`` (:class:`ManagedCollisions`): ids of any size (integers >= 0, or
    strings hashed into 63 bits) are given rows by TorchRec's managed-collision module instead of
    being looked up directly: for open-ended id spaces (users, items, shops) whose ids keep
    arriving. Not with ``out_of_range: modulo``, nor for sequence features.

    ``init_range``: the table's weights start uniform in ``[-init_range, init_range]``. Unset,
    TorchRec's ``sqrt(1 / num_embeddings)``: right for large id tables, but it starts a small
    vocabulary near zero (40 categories: +-0.16), too small for a recurrent model to tell its
    ids apart (DUPN's CTR AUC 0.755 instead of 0.812 with 1.0 on 200k rows; docs/models.md: DUPN).

    Ids derived from raw values (TorchEasyRec's names; docs/schema-and-data.md): ``boundaries``
    buckets a numeric column (RawFeature ``boundaries``), ``quantiles: N`` into N buckets of the
    training data's quantiles, ``vocab_list`` maps text ids to rows by a list (IdFeature
    ``vocab_list``; ``vocab_file`` in YAML is read into it), and ``combo`` hashes two or more columns'
    values as one id (ComboFeature). Their table sizes follow from the declaration
    (:func:`~lightning_mtr.derived.derive_rows`) except a combo's, which is its hash buckets.

    ``weight_column`` (TorchEasyRec's weighted IdFeature): a column of lists of numbers beside a
    ``multi_valued`` id column, one weight per id; the bag pools to ``sum_i w_i e_i`` (``pooling:
    mean``: ``sum_i w_i e_i / n``, TorchRec's weighted mean, over the bag's n ids, not its weights'
    sum). The ids travel as TorchRec's weighted ``KeyedJaggedTensor``, and the tables of weighted
    features are a collection of their own (``is_weighted=True``); features sharing a table all have
    weights or none do. Not with ``managed_collisions`` (its rows are reset in the unweighted collection).
    """

    name: str
    num_embeddings: int = 0  # 0: derived from boundaries, quantiles or vocab_list
    embedding_dim: int = 16
    column: str | None = None
    table: str | None = None
    pooling: Pooling = "sum"
    multi_valued: bool = False
    max_length: int | None = None
    out_of_range: OutOfRange = "error"
    hashed: bool = False
    sequence: bool = False
    side: Side = "user"
    init_range: float | None = None
    managed_collisions: ManagedCollisions | None = None
    boundaries: tuple[float, ...] | None = None
    quantiles: int | None = None
    vocab_list: tuple[str, ...] | None = None
    combo: tuple[str, ...] | None = None
    weight_column: str | None = None

    def __post_init__(self) -> None:
        derive_rows(self)
        managed = self.managed_collisions
        if isinstance(managed, dict):  # from YAML: checked and typed here
            allowed = sorted(f.name for f in fields(ManagedCollisions))
            unknown = sorted(set(managed) - set(allowed))
            if unknown:
                raise ValueError(f"sparse feature {self.name!r}: managed_collisions: unknown keys {unknown}; "
                                 f"allowed: {allowed}")
            object.__setattr__(self, "managed_collisions", ManagedCollisions(**managed))
        elif managed is not None and not isinstance(managed, ManagedCollisions):
            raise ValueError(f"sparse feature {self.name!r}: managed_collisions must be a mapping, e.g. "
                             f"{{eviction_policy: lfu}} ({{}} for the defaults), got {managed!r}")

    @property
    def source_column(self) -> str:
        return self.column or self.name

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns the feature reads: a combo's, else its source column."""
        return self.combo or (self.source_column,)

    @property
    def bucketized(self) -> bool:
        """A numeric column cut into buckets (``boundaries`` or ``quantiles``)."""
        return self.boundaries is not None or self.quantiles is not None

    @property
    def table_name(self) -> str:
        return self.table or self.name


@dataclass(frozen=True)
class DenseFeature:
    """A numeric feature; ``log1p`` applies to ``max(x, 0)`` (DLRM's Criteo convention).

    Standardisation uses the mean and std of the transformed training data. A null value is
    an error unless ``fill_missing`` gives the value to use. ``side``: as for a sparse feature.
    """

    name: str
    column: str | None = None
    transform: DenseTransform = "none"
    fill_missing: float | None = None
    side: Side = "user"

    @property
    def source_column(self) -> str:
        return self.column or self.name

    @property
    def standardized(self) -> bool:
        return self.transform.endswith("standardize")


@dataclass(frozen=True)
class Task:
    """A prediction target.

    ``label`` is a column or an expression over columns (``click * conversion``);
    ``sample_space`` (``click == 1``) selects the rows on which the task's loss and
    metrics are computed; ``None`` means every row (rows of other logs carry some label
    there, never used).

    Kinds: ``binary`` (0/1 label, BCE; AUC, logloss), ``regression`` (squared error; MSE),
    ``multiclass`` (label in ``0..num_classes-1``, softmax cross-entropy; accuracy, macro
    AUC, logloss) and ``ranking`` (relevance >= 0, graded or 0/1, compared only between rows
    of one ``group``, e.g. a request id; ``ranking_loss`` pairwise (RankNet), listwise
    (softmax) or pointwise (DUPN's ``n_i log(1 + exp(-y_i s_i))``, y = +1 where relevance > 0,
    else -1, averaged over rows); NDCG@k for each k in ``ndcg_at`` and GAUC of relevance > 0 per
    group). The point-wise weight ``n_i`` is 1, the value of ``weight_column`` (>= 0), or the
    ``pointwise_weights`` entry of the row's relevance grade (``{0: 1, 1: 1, 2: 5}``: a buy
    counts five times); a weight column is read like a label, so it is never a feature.
    ``gauc_by`` (a user-id column) adds GAUC, the AUC of each user's rows averaged with
    weights = the user's rows, to a binary task. Training shuffles a ranking task's groups
    as blocks, so the rows of one request stay together (a batch boundary may still split one).
    """

    name: str
    label: str
    kind: TaskKind = "binary"
    weight: float = 1.0
    sample_space: str | None = None
    num_classes: int | None = None
    group: str | None = None
    ranking_loss: RankingLoss = "listwise"
    weight_column: str | None = None
    pointwise_weights: dict[int, float] | None = field(default=None, hash=False)
    ndcg_at: tuple[int, ...] = (5, 10)
    gauc_by: str | None = None

    @property
    def output_size(self) -> int:
        """Logits per row: one per class for multiclass, else one."""
        return self.num_classes if self.kind == "multiclass" else 1

    @property
    def group_column(self) -> str | None:
        """The column whose rows are compared together: a ranking task's group, or ``gauc_by``."""
        return self.group if self.kind == "ranking" else self.gauc_by

    @property
    def label_expression(self) -> Expression:
        return Expression.parse(self.label)

    @property
    def sample_space_expression(self) -> Expression | None:
        return None if self.sample_space is None else Expression.parse(self.sample_space)


@dataclass(frozen=True)
class EmbeddingTable:
    """One embedding table and the features that look ids up in it."""

    name: str
    num_embeddings: int
    embedding_dim: int
    pooling: Pooling
    feature_names: tuple[str, ...]
    init_range: float | None = None  # None: TorchRec's sqrt(1 / num_embeddings)
    managed_collisions: ManagedCollisions | None = None
    weighted: bool = False  # its features' ids carry weights (weight_column)


@dataclass(frozen=True)
class Schema:
    """Features, tasks and the columns that must never be inputs (``ground_truth`` globs)."""

    tasks: tuple[Task, ...]
    sparse: tuple[SparseFeature, ...] = ()
    dense: tuple[DenseFeature, ...] = ()
    ground_truth: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def from_dict(cls, config: dict[str, Any], base: Path | None = None) -> Schema:
        """``base``: the directory ``vocab_file`` paths are relative to (the schema file's)."""
        unknown = set(config) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown schema keys {sorted(unknown)}; allowed: tasks, sparse, dense, ground_truth")
        return cls(
            tasks=tuple(_build(Task, t, "task") for t in config.get("tasks") or ()),
            sparse=tuple(_build(SparseFeature, read_vocab_file(f, base or Path.cwd()), "sparse feature")
                         for f in config.get("sparse") or ()),
            dense=tuple(_build(DenseFeature, f, "dense feature") for f in config.get("dense") or ()),
            ground_truth=tuple(config.get("ground_truth") or ()),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> Schema:
        """Load a schema file; ``extends: other.yaml`` (relative to this file) starts from
        another schema, whose top-level keys this file replaces (e.g. same features, other tasks)."""
        try:
            return cls.from_dict(_load_with_base(Path(path), seen=()), Path(path).parent)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
        except OSError as err:  # the file, or a file it extends
            where = "" if err.filename == str(path) else f"{path}: "
            raise ValueError(f"{where}cannot read schema file {err.filename}: {err.strerror} (a relative path is "
                             f"from the directory lightning-mtr runs in, `extends:` from the file's)") from None
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    @property
    def task_weights(self) -> dict[str, float]:
        """``{task: weight}`` as the schema sets them (static weighting)."""
        return {task.name: task.weight for task in self.tasks}

    @property
    def task_outputs(self) -> dict[str, int]:
        """``{task: logits per row}``: what task towers must produce."""
        return {task.name: task.output_size for task in self.tasks}

    @property
    def group_columns(self) -> list[str]:
        """Id columns that group rows for ranking losses and per-group metrics."""
        return list(dict.fromkeys(t.group_column for t in self.tasks if t.group_column is not None))

    @property
    def shuffle_group(self) -> str | None:
        """The ranking tasks' group column: training shuffles its runs of rows as blocks."""
        return next((t.group for t in self.tasks if t.kind == "ranking"), None)

    @cached_property
    def tables(self) -> list[EmbeddingTable]:
        """Embedding tables in first-use order; shared tables list all their features."""
        by_name: dict[str, list[SparseFeature]] = {}
        for feature in self.sparse:
            by_name.setdefault(feature.table_name, []).append(feature)
        return [
            EmbeddingTable(name, group[0].num_embeddings, group[0].embedding_dim, group[0].pooling,
                           tuple(f.name for f in group), group[0].init_range, group[0].managed_collisions,
                           group[0].weight_column is not None)
            for name, group in by_name.items()
        ]

    @property
    def pooled_tables(self) -> list[EmbeddingTable]:
        """Tables whose features are pooled into one vector per row (an ``EmbeddingBagCollection``)."""
        return [t for t in self.tables if t.name not in self._sequence_table_names]

    @property
    def managed_tables(self) -> list[EmbeddingTable]:
        """Pooled tables whose ids are given rows by managed collisions (:class:`ManagedCollisions`)."""
        return [t for t in self.pooled_tables if t.managed_collisions is not None]

    @property
    def sequence_tables(self) -> list[EmbeddingTable]:
        """Tables of ``sequence`` features, looked up unpooled (an ``EmbeddingCollection``)."""
        return [t for t in self.tables if t.name in self._sequence_table_names]

    @cached_property
    def _sequence_table_names(self) -> frozenset[str]:
        return frozenset(f.table_name for f in self.sparse if f.sequence)

    @cached_property
    def label_columns(self) -> frozenset[str]:
        """Every column a label or sample space reads: such columns are targets, never inputs."""
        columns: set[str] = set()
        for task in self.tasks:
            columns |= task.label_expression.columns
            if task.weight_column is not None:
                columns.add(task.weight_column)
            if task.sample_space_expression is not None:
                columns |= task.sample_space_expression.columns
        return frozenset(columns)

    @property
    def needs_dense_stats(self) -> bool:
        """Some dense feature is standardised, or a sparse one bucketed by quantiles, with
        training-data statistics."""
        return any(f.standardized for f in self.dense) or any(f.quantiles for f in self.sparse)

    @property
    def weighted(self) -> bool:
        """Some sparse feature has a ``weight_column``: the ids then carry weights (1 where none is given)."""
        return any(f.weight_column is not None for f in self.sparse)

    def features_on_side(self, side: Side) -> list[str]:
        """Names of the features (sparse, then dense, in schema order) tagged with ``side``."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {list(SIDES)}, got {side!r}")
        return [f.name for f in self.sparse + self.dense if f.side == side]

    @property
    def input_columns(self) -> list[str]:
        weights = [f.weight_column for f in self.sparse if f.weight_column is not None]
        return [c for f in self.sparse for c in f.columns] + weights + [f.source_column for f in self.dense]

    def _validate(self) -> None:
        if not self.tasks:
            raise ValueError("a schema needs at least one task")
        for kind, items in (("task", self.tasks), ("feature", self.sparse + self.dense)):
            names = [item.name for item in items]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"duplicate {kind} names: {duplicates}")
        for task in self.tasks:
            _validate_task(task)
        ranking_groups = {t.group for t in self.tasks if t.kind == "ranking"}
        if len(ranking_groups) > 1:
            raise ValueError(f"ranking tasks group rows by different columns {sorted(ranking_groups)}; training "
                             "keeps one column's groups together, so they must share one")
        for feature in self.sparse:
            _validate_sparse(feature)
        for feature in self.sparse + self.dense:
            if feature.side not in SIDES:
                raise ValueError(f"feature {feature.name!r}: side must be 'user' (the request: user, behaviours, "
                                 f"query, context) or 'item' (the candidate), got {feature.side!r}")
        for feature in self.dense:
            if feature.transform not in ("none", "standardize", "log1p", "log1p_standardize"):
                raise ValueError(f"dense feature {feature.name!r}: unknown transform {feature.transform!r}")
        self._validate_shared_tables()
        self._reject_leakage()

    def _validate_shared_tables(self) -> None:
        for table in self.tables:
            users = [f for f in self.sparse if f.table_name == table.name]
            shapes = {(f.num_embeddings, f.embedding_dim, f.pooling) for f in users}
            if len(shapes) > 1:
                raise ValueError(
                    f"features {[f.name for f in users]} share table {table.name!r} but disagree on "
                    f"(num_embeddings, embedding_dim, pooling): {sorted(shapes)}"
                )
            if len({f.init_range for f in users}) > 1:
                raise ValueError(f"features {[f.name for f in users]} share table {table.name!r} but disagree on "
                                 f"init_range: {[f.init_range for f in users]}; set it on each, or on none")
            if len({f.managed_collisions for f in users}) > 1:
                raise ValueError(f"features {[f.name for f in users]} share table {table.name!r} but disagree on "
                                 "managed_collisions; set the same on each")
            if len({f.weight_column is None for f in users}) > 1:
                raise ValueError(f"features {[f.name for f in users]} share table {table.name!r} but only some have "
                                 "a weight_column; a table's ids are weighted or not: give each one, or a table of its "
                                 "own")
            if len({f.sequence for f in users}) > 1:
                raise ValueError(f"table {table.name!r} mixes sequence and pooled features {[f.name for f in users]}; "
                                 "a table is looked up pooled or unpooled, so give the sequence its own table")
        dims = {f.name: f.embedding_dim for f in self.sparse if f.sequence}
        if len(set(dims.values())) > 1:
            raise ValueError(f"sequence features need one embedding_dim (TorchRec's EmbeddingCollection), got {dims}")

    def _reject_leakage(self) -> None:
        targets = self.label_columns
        for column in self.input_columns:
            if column in targets:
                raise ValueError(f"label leakage: column {column!r} is a task label or sample-space column "
                                 "and cannot also be a feature")
            matched = [p for p in self.ground_truth if fnmatch.fnmatchcase(column, p)]
            if matched:
                raise ValueError(f"label leakage: column {column!r} is ground truth (matches {matched[0]!r}) "
                                 "and cannot be a feature")


def _load_with_base(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path.resolve() in seen:
        raise ValueError(f"schema files extend each other in a cycle: {[str(p) for p in seen]}")
    with open(path) as handle:
        config = yaml.load(handle, Loader=_NamesAsText) or {}
    base = config.pop("extends", None)
    if base is None:
        return config
    return {**_load_with_base(path.parent / base, (*seen, path.resolve())), **config}


class _NamesAsText(yaml.SafeLoader):
    """YAML 1.1 reads an unquoted ``109_14`` as the integer 10914 and ``0123`` as 83 (octal), so
    Ali-CCP's columns went missing as ``'10914'``. Names, columns, tables, labels, sample spaces,
    ``ground_truth`` globs, a combo's columns and a vocabulary's ids are always text: their plain
    scalars keep the text as written."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value in _TEXT_KEYS:
                items = value.value if isinstance(value, yaml.SequenceNode) else [value]
                for item in items:
                    if isinstance(item, yaml.ScalarNode) and item.tag in _NUMBER_TAGS:
                        item.tag = "tag:yaml.org,2002:str"
        return super().construct_mapping(node, deep)


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")


def _validate_task(task: Task) -> None:
    where = f"task {task.name!r}"
    if task.kind not in TASK_KINDS:
        raise ValueError(f"{where}: kind must be one of {list(TASK_KINDS)}, got {task.kind!r}")
    if task.weight < 0:
        raise ValueError(f"{where}: weight must be >= 0, got {task.weight}")
    if (task.kind == "multiclass") != (task.num_classes is not None):
        raise ValueError(f"{where}: num_classes is required for kind multiclass, and only there")
    if task.num_classes is not None and task.num_classes < 2:
        raise ValueError(f"{where}: num_classes must be >= 2, got {task.num_classes}")
    if (task.kind == "ranking") != (task.group is not None):
        raise ValueError(f"{where}: group (the request-id column) is required for kind ranking, and only there")
    if task.ranking_loss not in RANKING_LOSS_NAMES:
        raise ValueError(f"{where}: ranking_loss must be one of {list(RANKING_LOSS_NAMES)}, got {task.ranking_loss!r}")
    _validate_pointwise_weights(task, where)
    if not task.ndcg_at or any(not isinstance(k, int) or k < 1 for k in task.ndcg_at):
        raise ValueError(f"{where}: ndcg_at must list integers >= 1, got {task.ndcg_at!r}")
    if task.gauc_by is not None and task.kind != "binary":
        raise ValueError(f"{where}: gauc_by is for binary tasks (ranking tasks report GAUC per group already)")
    for key, source in (("label", task.label), ("sample_space", task.sample_space)):
        try:
            Expression.parse(source) if source is not None else None
        except ValueError as err:  # too long or deep to evaluate, or not an expression: refused at load
            raise ValueError(f"{where}: {key}: {err}") from None


def _validate_pointwise_weights(task: Task, where: str) -> None:
    if task.weight_column is None and task.pointwise_weights is None:
        return
    if task.kind != "ranking" or task.ranking_loss != "pointwise":
        raise ValueError(f"{where}: weight_column and pointwise_weights weigh the rows of ranking_loss: pointwise; "
                         f"this task is {task.kind} with ranking_loss {task.ranking_loss!r}")
    if task.weight_column is not None and task.pointwise_weights is not None:
        raise ValueError(f"{where}: give the row weight by weight_column or by pointwise_weights, not both")
    table = task.pointwise_weights
    if table is None:
        return
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{where}: pointwise_weights maps relevance grades to weights, e.g. {{0: 1, 1: 1, 2: 5}}; "
                         f"got {table!r}")
    for grade, weight in table.items():
        if isinstance(grade, bool) or not isinstance(grade, int) or grade < 0:
            raise ValueError(f"{where}: pointwise_weights keys are relevance grades (integers >= 0), got {grade!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ValueError(f"{where}: pointwise_weights[{grade}] must be a finite number >= 0, got {weight!r}")


def _validate_sparse(feature: SparseFeature) -> None:
    where = f"sparse feature {feature.name!r}"
    if feature.num_embeddings < 1 or feature.embedding_dim < 1:
        raise ValueError(f"{where}: num_embeddings and embedding_dim must be >= 1")
    if feature.pooling not in ("sum", "mean"):
        raise ValueError(f"{where}: pooling must be 'sum' or 'mean', got {feature.pooling!r}")
    if feature.out_of_range not in ("error", "modulo"):
        raise ValueError(f"{where}: out_of_range must be 'error' or 'modulo', got {feature.out_of_range!r}")
    _validate_managed(feature, where)
    validate_derived(feature, where)
    if feature.max_length is not None and (not (feature.multi_valued or feature.sequence) or feature.max_length < 1):
        raise ValueError(f"{where}: max_length needs multi_valued: true (or sequence: true) and a value >= 1")
    _validate_weights(feature, where)
    init = feature.init_range
    if init is not None and (isinstance(init, bool) or not isinstance(init, (int, float)) or not 0 < init < math.inf):
        raise ValueError(f"{where}: init_range must be a positive number (weights start uniform in "
                         f"[-init_range, init_range]), got {feature.init_range!r}")


def _validate_weights(feature: SparseFeature, where: str) -> None:
    if feature.weight_column is None:
        return
    if feature.sequence:
        raise ValueError(f"{where}: weight_column weighs the ids of a pooled bag; a sequence is read unpooled, one "
                         "embedding per element: drop weight_column or sequence")
    if not feature.multi_valued:
        raise ValueError(f"{where}: weight_column gives one weight per id of a multi_valued feature (lists of ids, "
                         "lists of weights); set multi_valued: true (a single id's weight would only scale its "
                         "embedding: a dense feature does that)")
    if feature.managed_collisions is not None:
        raise ValueError(f"{where}: weight_column and managed_collisions together are not supported: a managed "
                         "table's reset rows are looked for in the unweighted collection; drop one of them")
    if feature.weight_column == feature.source_column:
        raise ValueError(f"{where}: weight_column {feature.weight_column!r} is the id column itself; name the column "
                         "of weights")


def _validate_managed(feature: SparseFeature, where: str) -> None:
    managed = feature.managed_collisions
    if managed is None:
        return
    if feature.out_of_range == "modulo":
        raise ValueError(f"{where}: managed_collisions gives every id its own row; out_of_range: modulo would fold "
                         "ids first: drop one of them")
    if feature.sequence:
        raise ValueError(f"{where}: managed_collisions is for pooled tables; a sequence feature's table is "
                         "looked up directly (use hashed or out_of_range: modulo)")
    if managed.eviction_policy not in EVICTION_POLICIES:
        raise ValueError(f"{where}: managed_collisions: eviction_policy must be one of {list(EVICTION_POLICIES)}, "
                         f"got {managed.eviction_policy!r}")
    interval = managed.eviction_interval
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"{where}: managed_collisions: eviction_interval must be an integer >= 1 (training steps "
                         f"between evictions), got {interval!r}")
    decay = managed.decay_exponent
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay >= 0:
        raise ValueError(f"{where}: managed_collisions: decay_exponent must be a number >= 0 (distance_lfu divides an "
                         f"id's count by its age to this power; 0: no decay), got {decay!r}")
    if feature.num_embeddings < 2:
        raise ValueError(f"{where}: a managed table needs num_embeddings >= 2 (its last row is for ids without one)")


def _build(cls: type, config: Any, what: str) -> Any:
    if not isinstance(config, dict):
        raise ValueError(f"each {what} must be a mapping, got {config!r}")
    allowed = {f.name for f in fields(cls)}
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(f"{what} {config.get('name', '?')!r}: unknown keys {sorted(unknown)}; "
                         f"allowed: {sorted(allowed)}")
    # a dict written in code may name column 101 by the int; Arrow column names are strings
    names = {k: str(v) if k in _NAME_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) else v
             for k, v in config.items()}
    names = {k: tuple(v) if isinstance(v, list) else v for k, v in names.items()}  # frozen: hashable
    return cls(**names)


_NAME_KEYS = ("name", "column", "table", "group", "gauc_by", "weight_column")
_TEXT_KEYS = (*_NAME_KEYS, "label", "sample_space", "ground_truth", "combo", "vocab_list")


__all__ = ["DenseFeature", "EmbeddingTable", "ManagedCollisions", "Schema", "SparseFeature", "Task"]
