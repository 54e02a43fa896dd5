"""``lightning-mtr fit --warm_start PATH``: a new run that starts from an earlier run's checkpoint.

A daily job trains today's log starting from yesterday's model. ``--ckpt_path`` cannot do that:
it continues yesterday's *run* (its epoch, step, learning-rate schedule and data position, so a
new day would need a higher ``max_epochs``). A warm start takes the model's weights and tables
(from a checkpoint of any layout and world size: DCP reshards them) and, by choice, the sparse
optimizer's state and the dense statistics; the loop, the dense optimizer, the schedule and the
data position start afresh. The strategy applies it at the end of its setup
(``TableStrategy._warm_start``), where a resume restores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from jsonargparse.typing import OpenUnitInterval

from lightning_mtr.data.encode import DenseStats
from lightning_mtr.training.distributed.checkpoint import CheckpointError

SparseOptimizerChoice = Literal["reset", "keep"]
DenseStatsChoice = Literal["keep", "recompute", "blend"]


@dataclass(frozen=True)
class WarmStart:
    """Where a warm start comes from and what it takes besides the weights and tables.

    Args:
        path: a checkpoint directory (either training path, any world size) or a single file
            (``lightning-mtr consolidate``'s: weights and statistics, no optimizer state).
        sparse_optimizer: ``reset`` (default) starts the tables' optimizer state afresh (Adagrad's
            accumulators at zero: every row takes full-size steps again); ``keep`` takes the
            checkpoint's, so rows trained for days keep their smaller steps.
        dense_stats: the mean/std that standardise dense features. ``keep`` (default) uses the
            checkpoint's, the ones its weights were trained with; ``recompute`` takes this run's
            training data's; ``blend`` mixes the two (:func:`~lightning_mtr.data.stats.blend_stats`).
        blend: ``blend``'s weight of this run's statistics (0.5: equal; repeated daily, the
            statistics of ``k`` days ago weigh ``blend * (1 - blend) ** k``).
    """

    path: str
    sparse_optimizer: SparseOptimizerChoice = "reset"
    dense_stats: DenseStatsChoice = "keep"
    blend: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.blend < 1.0:
            raise ValueError(f"warm_start_blend is {self.blend}: the weight of this run's dense statistics must lie "
                             "strictly between 0 and 1 (warm_start_dense_stats keep is 0, recompute is 1)")

    @property
    def todays_weight(self) -> float:
        """The weight of this run's training statistics against the checkpoint's."""
        return {"keep": 0.0, "recompute": 1.0, "blend": self.blend}[self.dense_stats]


def saved_dense_stats(state: dict[str, Any], datamodule: Any) -> DenseStats | None:
    """The dense statistics a checkpoint's trainer state holds for ``datamodule`` (Lightning keeps a
    data module's ``state_dict`` under its class name)."""
    saved = (state.get(type(datamodule).__qualname__) or {}).get("dense_stats")
    return DenseStats(**{k: tuple(v) for k, v in saved.items()}) if saved else None


def add_arguments(parser) -> None:
    """``fit``'s options, flat so that ``--warm_start PATH`` reads as it does in a daily job's
    command; in YAML, top-level keys (``warm_start: runs/day1/checkpoints/last.ckpt``,
    ``warm_start_dense_stats: blend``)."""
    parser.add_argument("--warm_start", type=str | None, default=None,
                        help="start a new run (fresh loop, schedule, data position) from this checkpoint's weights "
                             "and tables")
    parser.add_argument("--warm_start_sparse_optimizer", type=SparseOptimizerChoice, default="reset",
                        help="the tables' optimizer state: reset, or keep the checkpoint's")
    parser.add_argument("--warm_start_dense_stats", type=DenseStatsChoice, default="keep",
                        help="dense statistics: keep the checkpoint's, recompute them, or blend the two")
    parser.add_argument("--warm_start_blend", type=OpenUnitInterval, default=0.5,
                        help="blend's weight of this run's dense statistics, in (0, 1)")


def hand_to_strategy(config, strategy) -> None:
    """Give ``fit``'s strategy the warm start its config asks for, if any (it applies it in setup)."""
    if config.get("warm_start") is None:
        return
    if config.get("ckpt_path") is not None:
        raise CheckpointError(f"--warm_start {config.warm_start} starts a new run from a checkpoint's weights, "
                              f"--ckpt_path {config.ckpt_path} continues a run: pass one of them")
    if not hasattr(strategy, "warm_start"):
        raise CheckpointError("--warm_start needs trainer.strategy auto (the default), lightning_mtr.training."
                              f"distributed.SingleProcessStrategy or TorchRecStrategy, not {type(strategy).__name__}")
    strategy.warm_start = WarmStart(config.warm_start, config.warm_start_sparse_optimizer,
                                    config.warm_start_dense_stats, float(config.warm_start_blend))
