"""Task weighting: how the per-task losses become the one training loss.

Each scheme is a module built from the schema (``class_path`` + ``init_args`` in YAML under
``model.task_weighting``), so learned weights (uncertainty) are trained by the dense optimizer
and per-epoch state (DWA, PLE's schedule) travels in checkpoints as buffers. The schema's
``weight`` is each task's base weight; a task with weight 0 (a derived output such as ESMM's
pCVR) stays out of the loss under every scheme, and out of every scheme's normalisation (DWA's
and GradNorm's weights sum to the number of *trained* tasks). Terms a model adds to its loss
outside the task losses (AITM's calibrator) are never weighted here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from lightning_mtr.embeddings.fusing import dense_parameters
from lightning_mtr.nn import last_layer_weights
from lightning_mtr.schema import Schema
from lightning_mtr.tasks.losses import weighted_total


class TaskWeighting(nn.Module):
    """``forward(losses) -> total``; ``weights()`` for logging; the hooks of
    :class:`~lightning_mtr.interfaces.WeightingHooks` as no-ops: ``end_epoch`` for schemes that
    change between epochs (given each task's mean training loss that epoch), ``attach`` for those
    that read the model's parameters."""

    def __init__(self, schema: Schema):
        super().__init__()
        self.tasks = list(schema.tasks)
        self.names = [t.name for t in self.tasks]
        self.trained = [t.name for t in self.tasks if t.weight]  # the tasks a scheme weighs

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return weighted_total(losses, self.weights())

    def weights(self) -> dict[str, torch.Tensor | float]:
        return {t.name: t.weight for t in self.tasks}

    def end_epoch(self, epoch_losses: Mapping[str, float]) -> None:
        """Nothing changes between epochs unless a scheme says so."""

    def attach(self, model: nn.Module) -> None:
        """Called with the materialised model, for schemes that look at its parameters."""

    def _scaled(self, factors: Sequence[torch.Tensor | float]) -> dict[str, torch.Tensor | float]:
        """Each trained task's schema weight times its factor (``factors`` in ``self.trained``'s
        order); 0 for the tasks with weight 0."""
        factor = dict(zip(self.trained, factors))
        return {t.name: t.weight * factor[t.name] if t.weight else 0.0 for t in self.tasks}


class StaticWeights(TaskWeighting):
    """The schema's weights, fixed (the default)."""


class UncertaintyWeights(TaskWeighting):
    """Kendall, Gal and Cipolla (CVPR 2018): a learned noise sigma_k per task,
    ``sum_k c_k / sigma_k^2 * L_k + log sigma_k`` with ``c = 1/2`` for regression and ``1`` for
    classification; sigma is learned as ``s = log sigma^2`` (numerically stable), so the
    total is ``sum_k c_k e^{-s_k} L_k + s_k / 2``.

    ``s`` is kept at or above ``min_log_variance`` by projection: before every use it is clamped
    in place, so a task whose loss reaches 0 (where ``s -> -inf`` and the total -> -inf) stops at
    the bound with a finite total, and since the bound is applied to the parameter itself (not
    to a copy whose gradient would be 0 below it), ``s`` moves up again as soon as its gradient
    ``1/2 - c e^{-s} L`` turns negative, i.e. once ``L > e^{s_min} / (2c)``. The default -10 caps
    a task's weight at ``e^10`` (about 22,000) times its schema weight and binds only for
    losses below ``e^-10 / 2``, about 2.3e-5 (4.5e-5 for regression), far below any real
    task's (``make train``'s val loglosses: ctr 0.31, ctcvr 0.09).

    Args:
        min_log_variance: the lower bound of ``s = log sigma^2``.
    """

    def __init__(self, schema: Schema, min_log_variance: float = -10.0):
        super().__init__(schema)
        self.min_log_variance = min_log_variance
        self.log_variance = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in self.trained})

    def reset_parameters(self) -> None:
        for value in self.log_variance.values():
            nn.init.zeros_(value)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():  # the projection step of projected gradient descent
            for value in self.log_variance.values():
                value.clamp_(min=self.min_log_variance)
        return weighted_total(losses, self.weights()) + 0.5 * sum(self.log_variance.values())

    def weights(self) -> dict[str, torch.Tensor | float]:
        scale = {"regression": 0.5}
        kinds = {t.name: t.kind for t in self.tasks}
        return self._scaled([scale.get(kinds[name], 1.0) * torch.exp(-self.log_variance[name])
                             for name in self.trained])


class DynamicWeightAverage(TaskWeighting):
    """Liu, Johns and Davison (CVPR 2019): ``w_k(t) = K exp(r_k / T) / sum_i exp(r_i / T)`` with
    ``r_k = L_k(t-1) / L_k(t-2)``, the ratio of a task's last two epoch losses: a task whose
    loss falls slowly gets more weight. Weight 1 for the first two epochs. K and the softmax run
    over the trained tasks only (schema weight > 0), so their weights sum to K; a weight-0 task
    (ESMM's pCVR) stays at 0 and takes no share.

    Args:
        temperature: T; larger is closer to equal weights.
    """

    def __init__(self, schema: Schema, temperature: float = 2.0):
        super().__init__(schema)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.register_buffer("history", torch.full((2, len(self.trained)), float("nan")))  # epochs t-2, t-1
        self.register_buffer("current", torch.ones(len(self.trained)))

    def weights(self) -> dict[str, torch.Tensor | float]:
        return self._scaled(self.current)

    def end_epoch(self, epoch_losses: Mapping[str, float]) -> None:
        latest = torch.tensor([epoch_losses[name] for name in self.trained], device=self.history.device)
        self.history.copy_(torch.stack([self.history[1], latest]))
        if torch.isnan(self.history).any():
            return
        ratios = self.history[1] / self.history[0].clamp_min(1e-12)
        self.current.copy_(len(self.trained) * torch.softmax(ratios / self.temperature, dim=0))


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

    Per step, with ``n_i = ||grad_W L_i||`` over the shared weights ``W`` and weights
    ``w = T softmax(v)`` (so they always sum to T, the paper's renormalisation), the weights
    minimise ``sum_i |w_i n_i - mean_j(w_j n_j) r_i^alpha|`` (the target held constant) with
    ``r_i`` each task's loss ratio relative to the mean, while the model trains on
    ``sum_i w_i L_i`` (weights held constant). T counts the trained tasks (schema weight > 0);
    the learned weights replace their schema weights. Applied to shared *dense* weights only:
    the fused sparse optimizer updates the embeddings inside backward, where GradNorm cannot
    reach them. Costs one partial backward (down to ``W``) per task per step.

    ``W`` is, as in the paper, the weight matrix of the last shared layer (``layer: last``):
    the layer whose output every task reads, found by :func:`lightning_mtr.nn.last_layer_weights` (a
    Shared-Bottom MLP's last Linear; a mixture bottom's last expert layer, all experts'
    weights as one batched tensor; PLE's last CGC level's shared experts' last layer, since
    that level's task experts reach one task only). ``layer: all`` takes every trainable
    parameter of ``shared`` instead. ``shared`` may also name one layer (``bottom.mlp.2``).

    Args:
        shared: the model's submodule that holds ``W``: ``bottom`` for MMoE, OMoE, the YouTube
            ranker, Shared-Bottom (and ESMM/ESM2 given a bottom with layers), ``levels`` for PLE,
            ``mlp`` for NFwFM.
        layer: ``last`` (the paper) or ``all``.
        alpha: the restoring force's strength (the paper: 0.12 to 3).
    """

    def __init__(self, schema: Schema, shared: str = "bottom", layer: Literal["last", "all"] = "last",
                 alpha: float = 1.5):
        super().__init__(schema)
        if layer not in ("last", "all"):
            raise ValueError(f"GradNorm: layer must be 'last' (the paper) or 'all', got {layer!r}")
        self.shared, self.layer = shared, layer
        self.alpha = alpha
        if len(self.trained) < 2:
            raise ValueError("GradNorm balances two or more tasks with a non-zero weight")
        self.logits = nn.Parameter(torch.zeros(len(self.trained)))
        self.register_buffer("initial_losses", torch.full((len(self.trained),), float("nan")))
        self.shared_weights: list[nn.Parameter] = []  # W, set by attach (the model owns them)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.logits)

    def attach(self, model: nn.Module) -> None:
        """Find ``W`` in the materialised model; refuse a module that has none (e.g. ESMM's
        parameter-free shared input), naming the modules that have some."""
        candidates = [name for name, m in model.named_modules()
                      if name and name.count(".") < 2 and dense_parameters(m)]
        try:
            module = model.get_submodule(self.shared)
        except AttributeError:
            raise ValueError(f"GradNorm: the model has no submodule {self.shared!r} to balance gradients on; "
                             f"its modules with trainable dense parameters: {candidates}") from None
        if not dense_parameters(module):
            raise ValueError(
                f"GradNorm: the model's {self.shared!r} ({type(module).__name__}) has no trainable dense "
                f"parameters, so there is no gradient to balance; name one that has (shared: ...): {candidates}, "
                "or give the model shared layers (ESMM's and ESM2's bottom: lightning_mtr.nn.SharedMLP or "
                "MixtureBottom)")
        last = self.layer == "last"
        try:
            self.shared_weights = last_layer_weights(module) if last else dense_parameters(module)
        except ValueError as error:
            raise ValueError(f"GradNorm: {error} ({self.shared!r}); name a layer directly (e.g. shared: "
                             "bottom.mlp.0) or use layer: all") from None

    def current(self) -> torch.Tensor:
        return len(self.trained) * torch.softmax(self.logits, dim=0)

    def weights(self) -> dict[str, torch.Tensor | float]:
        current = dict(zip(self.trained, self.current()))
        return {name: current.get(name, 0.0) for name in self.names}  # what forward trains with

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        weights = self.current()
        task_losses = torch.stack([losses[name] for name in self.trained])
        model_loss = (weights.detach() * task_losses).sum()
        if not torch.is_grad_enabled() or not self.shared_weights:
            return model_loss
        norms = torch.stack([_gradient_norm(loss, self.shared_weights) for loss in task_losses])
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

