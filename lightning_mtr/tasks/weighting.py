"""Task weighting: how the per-task losses become the one training loss.

Each scheme is a module built from the schema (``class_path`` + ``init_args`` in YAML under
``model.task_weighting``), so learned weights (uncertainty) are trained by the dense optimizer
and per-epoch state (DWA, PLE's schedule) travels in checkpoints as buffers. The schema's
``weight`` is each task's base weight; a task with weight 0 (a derived output such as ESMM's
pCVR) stays out of the loss under every scheme.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lightning_mtr.schema import Schema
from lightning_mtr.tasks.losses import weighted_total


class TaskWeighting(nn.Module):
    """``forward(losses) -> total``; ``weights()`` for logging; ``end_epoch`` for schemes that
    change between epochs (given each task's mean training loss that epoch)."""

    def __init__(self, schema: Schema):
        super().__init__()
        self.tasks = list(schema.tasks)
        self.names = [t.name for t in self.tasks]

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return weighted_total(losses, self.weights())

    def weights(self) -> dict[str, torch.Tensor | float]:
        return {t.name: t.weight for t in self.tasks}

    def end_epoch(self, epoch_losses: Mapping[str, float]) -> None:
        """Nothing changes between epochs unless a scheme says so."""

    def attach(self, model: nn.Module) -> None:
        """Called with the materialised model, for schemes that look at its parameters."""


class StaticWeights(TaskWeighting):
    """The schema's weights, fixed (the default)."""


class UncertaintyWeights(TaskWeighting):
    """Kendall, Gal and Cipolla (CVPR 2018): a learned noise sigma_k per task,
    ``sum_k c_k / sigma_k^2 * L_k + log sigma_k`` with ``c = 1/2`` for regression and ``1`` for
    classification; sigma is learned as ``s = log sigma^2`` (stable, unconstrained).
    """

    def __init__(self, schema: Schema):
        super().__init__(schema)
        self.log_variance = nn.ParameterDict({t.name: nn.Parameter(torch.zeros(())) for t in self.tasks if t.weight})

    def reset_parameters(self) -> None:
        for value in self.log_variance.values():
            nn.init.zeros_(value)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return weighted_total(losses, self.weights()) + 0.5 * sum(self.log_variance.values())

    def weights(self) -> dict[str, torch.Tensor | float]:
        scale = {"regression": 0.5}
        return {t.name: t.weight * scale.get(t.kind, 1.0) * torch.exp(-self.log_variance[t.name]) if t.weight else 0.0
                for t in self.tasks}


class DynamicWeightAverage(TaskWeighting):
    """Liu, Johns and Davison (CVPR 2019): ``w_k(t) = K exp(r_k / T) / sum_i exp(r_i / T)`` with
    ``r_k = L_k(t-1) / L_k(t-2)``, the ratio of a task's last two epoch losses: a task whose
    loss falls slowly gets more weight. Weight 1 for the first two epochs.

    Args:
        temperature: T; larger is closer to equal weights.
    """

    def __init__(self, schema: Schema, temperature: float = 2.0):
        super().__init__(schema)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.register_buffer("history", torch.full((2, len(self.names)), float("nan")))  # epochs t-2, t-1
        self.register_buffer("current", torch.ones(len(self.names)))

    def weights(self) -> dict[str, torch.Tensor | float]:
        return {t.name: t.weight * self.current[k] for k, t in enumerate(self.tasks)}

    def end_epoch(self, epoch_losses: Mapping[str, float]) -> None:
        latest = torch.tensor([epoch_losses[name] for name in self.names], device=self.history.device)
        self.history.copy_(torch.stack([self.history[1], latest]))
        if torch.isnan(self.history).any():
            return
        ratios = self.history[1] / self.history[0].clamp_min(1e-12)
        self.current.copy_(len(self.names) * torch.softmax(ratios / self.temperature, dim=0))


class ScheduledWeights(TaskWeighting):
    """PLE's dynamic weights (Tang et al., RecSys 2020): ``w_k(t) = w_k,0 * gamma_k^t`` at epoch
    t, with ``w_k,0`` the schema's weight.

    Args:
        gamma: per task name, its decay (or growth) factor per epoch; tasks left out keep 1.
    """

    def __init__(self, schema: Schema, gamma: dict[str, float]):
        super().__init__(schema)
        unknown = sorted(set(gamma) - set(self.names))
        if unknown:
            raise ValueError(f"gamma names unknown tasks {unknown}; the schema's tasks: {self.names}")
        self.gamma = dict(gamma)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("gammas", torch.tensor([self.gamma.get(n, 1.0) for n in self.names]), persistent=False)

    def weights(self) -> dict[str, torch.Tensor]:
        current = self.gammas ** self.epoch  # on the device: no wait for the GPU every step
        return {t.name: t.weight * current[k] for k, t in enumerate(self.tasks)}

    def end_epoch(self, epoch_losses: Mapping[str, float]) -> None:
        self.epoch += 1


class GradNorm(TaskWeighting):
    """Chen et al. (ICML 2018): learned weights that balance each task's gradient norm on the
    shared layers, pulling tasks that train slowly (``L_i(t) / L_i(0)`` high) up.

    Per step, with ``n_i = ||grad_W L_i||`` over the shared parameters ``W`` and weights
    ``w = T softmax(v)`` (so they always sum to T, the paper's renormalisation), the weights
    minimise ``sum_i |w_i n_i - mean_j(w_j n_j) r_i^alpha|`` (the target held constant) with
    ``r_i`` each task's loss ratio relative to the mean, while the model trains on
    ``sum_i w_i L_i`` (weights held constant). Applied to the shared *dense* parameters only:
    the fused sparse optimizer updates the embeddings inside backward, where GradNorm cannot
    reach them. Costs one partial backward (down to ``W``) per task per step.

    Args:
        shared: the model's submodule whose parameters are ``W`` (e.g. ``bottom`` for MMoE,
            PLE and Shared-Bottom).
        alpha: the restoring force's strength (the paper: 0.12 to 3).
    """

    def __init__(self, schema: Schema, shared: str = "bottom", alpha: float = 1.5):
        super().__init__(schema)
        self.shared = shared
        self.alpha = alpha
        self.trained = [t.name for t in self.tasks if t.weight]
        if len(self.trained) < 2:
            raise ValueError("GradNorm balances two or more tasks with a non-zero weight")
        self.logits = nn.Parameter(torch.zeros(len(self.trained)))
        self.register_buffer("initial_losses", torch.full((len(self.trained),), float("nan")))
        self._parameters_of: list = []  # the shared parameters, set by attach (not a submodule: not owned)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.logits)

    def attach(self, model: nn.Module) -> None:
        try:
            module = model.get_submodule(self.shared)
        except AttributeError:
            raise ValueError(f"GradNorm: the model has no submodule {self.shared!r} to balance gradients on") from None
        self._parameters_of = [p for p in module.parameters() if p.requires_grad]

    def current(self) -> torch.Tensor:
        return len(self.trained) * torch.softmax(self.logits, dim=0)

    def weights(self) -> dict[str, torch.Tensor | float]:
        current = dict(zip(self.trained, self.current()))
        return {t.name: t.weight * current[t.name] if t.weight else 0.0 for t in self.tasks}

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        weights = self.current()
        task_losses = torch.stack([losses[name] for name in self.trained])
        model_loss = (weights.detach() * task_losses).sum()
        if not torch.is_grad_enabled() or not self._parameters_of:
            return model_loss
        norms = torch.stack([_gradient_norm(loss, self._parameters_of) for loss in task_losses])
        # L_i(0): the first loss above 0 (an empty sample space or a batch with nothing to rank
        # gives 0), set without asking the GPU whether it is the first
        unset = self.initial_losses.isnan() & (task_losses.detach() > 0)
        self.initial_losses.copy_(torch.where(unset, task_losses.detach(), self.initial_losses))
        ratios = task_losses.detach() / self.initial_losses.nan_to_num(1.0).clamp_min(1e-12)
        target = ((weights * norms).mean() * (ratios / ratios.mean()) ** self.alpha).detach()
        return model_loss + (weights * norms - target).abs().sum()


def _gradient_norm(loss: torch.Tensor, parameters: list[nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) + 1e-24)
