"""Per-task losses, masked by each task's sample space."""

from lightning_mtr.tasks.losses import masked_task_losses, weighted_total

__all__ = ["masked_task_losses", "weighted_total"]
