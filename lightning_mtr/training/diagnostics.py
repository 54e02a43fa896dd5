"""Gate diagnostics for mixture-of-experts models: what each gate does with its experts.

A gated block (e.g. :class:`~lightning_mtr.nn.bottoms.MixtureBottom`) implements
:class:`~lightning_mtr.interfaces.GatedBlock`:
``gate_weights(inputs) -> ({gate: softmax [B, E]}, expert outputs [B, E, D])``. On validation
batches this callback records, per gate, the mean weight of each expert and the mean entropy,
logs them as ``gates/{gate}/expert{e}`` and ``gates/{gate}/entropy``, warns when a gate
collapses onto one expert or two experts compute nearly the same thing (MMoE's failure modes),
and draws a gates x experts heatmap at the end of fit.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure

from lightning_mtr.interfaces import GatedBlock


class GateDiagnostics(L.Callback):
    """Per-gate expert usage on validation data.

    Args:
        max_batches: validation batches per epoch to measure (the gates run a second time on them).
        collapse: warn when one expert's mean weight in a gate exceeds this.
        similarity: warn when two experts' outputs have a mean cosine similarity above this.
        heatmap: file name of the gates x experts heatmap written at the end of fit (in the
            trainer's log directory); empty to skip it.
    """

    def __init__(self, max_batches: int = 8, collapse: float = 0.95, similarity: float = 0.99,
                 heatmap: str = "gates.png"):
        self.max_batches = max_batches
        self.collapse = collapse
        self.similarity = similarity
        self.heatmap = heatmap
        self._handles: list = []
        self._batches = 0
        self._weights: dict[str, list] = {}  # gate -> [summed weights [E], summed entropy, rows]
        self._cosine: dict[str, list] = {}  # gated module -> [summed expert x expert cosine, rows]
        self.last: dict[str, torch.Tensor] = {}  # the last epoch's mean weight of each expert, per gate

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._batches, self._weights, self._cosine = 0, {}, {}
        for name, module in pl_module.named_modules():
            if isinstance(module, GatedBlock):
                self._handles.append(module.register_forward_pre_hook(partial(self._record, name)))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batches += 1

    @torch.no_grad()
    def _record(self, name: str, module: torch.nn.Module, args: tuple) -> None:
        if self._batches >= self.max_batches:
            return
        weights, experts = module.gate_weights(args[0])
        rows = experts.shape[0]
        for gate, w in weights.items():
            entry = self._weights.setdefault(gate, [0, 0.0, 0])
            entry[0] = entry[0] + w.sum(0).cpu()
            entry[1] += float(-(w * w.clamp_min(1e-12).log()).sum())
            entry[2] += rows
        unit = torch.nn.functional.normalize(experts.float(), dim=-1)  # [B, E, D]
        # two all-zero outputs (ReLU experts are often zero on a row) are the same output: cosine 1
        zero = (experts.float().abs().amax(dim=-1) == 0).float()  # [B, E]
        entry = self._cosine.setdefault(name, [0, 0])
        entry[0] = entry[0] + (torch.einsum("bed,bfd->ef", unit, unit) + torch.einsum("be,bf->ef", zero, zero)).cpu()
        entry[1] += rows

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if trainer.sanity_checking or not self._weights:
            return
        self.last = {gate: total / rows for gate, (total, _, rows) in self._weights.items()}
        for gate, (_, entropy_sum, rows) in self._weights.items():
            mean, entropy = self.last[gate], entropy_sum / rows
            for e, value in enumerate(mean.tolist()):
                pl_module.log(f"gates/{gate}/expert{e}", value, sync_dist=True)
            pl_module.log(f"gates/{gate}/entropy", entropy, sync_dist=True)
            if float(mean.max()) > self.collapse:
                reachable = int((mean > 0).sum())  # a PLE task gate sees only its own and the shared experts
                rank_zero_warn(f"gate {gate!r} has collapsed onto expert {int(mean.argmax())} (mean weight "
                               f"{float(mean.max()):.3f}; entropy {entropy:.3f} of at most "
                               f"{math.log(max(reachable, 1)):.3f})")
        for name, (total, rows) in self._cosine.items():
            cosine = total / rows
            cosine.fill_diagonal_(-1.0)
            first, second = divmod(int(cosine.argmax()), cosine.shape[1])
            if float(cosine.max()) > self.similarity:
                rank_zero_warn(f"experts {first} and {second} of {name or 'the model'} are near-identical (mean "
                               f"cosine similarity of their outputs {float(cosine.max()):.4f}): the mixture "
                               "wastes capacity")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.last or not self.heatmap:
            return
        directory = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank asks
        if not trainer.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        gates = list(self.last)
        values = torch.stack([self.last[g] for g in gates]).numpy()
        figure = Figure(figsize=(1.0 + 0.6 * values.shape[1], 1.0 + 0.5 * len(gates)), layout="constrained")
        axes = figure.subplots()
        image = axes.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        axes.set_xticks(range(values.shape[1]), [f"e{e}" for e in range(values.shape[1])])
        axes.set_yticks(range(len(gates)), gates)
        axes.set_xlabel("expert")
        axes.set_title("mean gate weight (validation)")
        figure.colorbar(image, ax=axes)
        figure.savefig(directory / self.heatmap, dpi=100)
        rank_zero_info(f"gate heatmap written to {directory / self.heatmap}")
