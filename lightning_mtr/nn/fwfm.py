"""FwFM (Pan et al., WWW 2018, "Field-weighted Factorization Machines for Click-Through Rate
Prediction in Display Advertising"): an FM whose every field pair (i, j) has its own learned
scalar weight r_ij.

Shape letters: B batch, F fields (here: one per sparse feature, also when features share a
table), k the one dim all field vectors share, P = F(F-1)/2 field pairs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class FieldVectors(nn.Module):
    """Pooled embeddings ``[B, sum of dims]`` (``FeatureInput.pooled``) -> field vectors ``[B, F, k]``.

    Inner products need one k. ``dim=None``: every feature must already have it (a view, no
    parameters); a schema whose features differ is refused, naming them. ``dim=k``: each field
    gets its own bias-free linear map from its ``embedding_dim`` to k, also a field already of
    dim k, so that every field is treated alike.

    Args:
        dims: ``{feature: embedding_dim}`` in the order of the pooled blocks (``FeatureInput.field_dims``).
        dim: k, or None to use the schema's common ``embedding_dim``.
    """

    def __init__(self, dims: Mapping[str, int], dim: int | None = None):
        super().__init__()
        self.dims = list(dims.values())
        if dim is None:
            by_dim: dict[int, list[str]] = {}
            for name, width in dims.items():
                by_dim.setdefault(width, []).append(name)
            if len(by_dim) > 1:
                found = "; ".join(f"embedding_dim {width}: {names}" for width, names in sorted(by_dim.items()))
                raise ValueError(f"FwFM takes inner products of field vectors, so every sparse feature needs the "
                                 f"same embedding_dim; the schema has {found}. Give them one embedding_dim, or "
                                 f"set field_dim to project each feature to a common dim")
            dim = self.dims[0] if self.dims else 0
            self.projections = None
        else:
            self.projections = nn.ModuleList(nn.Linear(width, dim, bias=False) for width in self.dims)
        self.dim = dim

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.projections is None:
            return pooled.view(pooled.shape[0], len(self.dims), self.dim)
        blocks = pooled.split(self.dims, dim=1)
        return torch.stack([project(block) for project, block in zip(self.projections, blocks)], dim=1)


class FwFM(nn.Module):
    """``[B, F, k] -> [B]``: ``w0 + sum_i <v_i, w_i> + sum_{i<j} r_ij <v_i, v_j>``.

    The linear terms are the paper's FwFM_FiLV (one k-vector w_i per field, F*k parameters,
    read from the same field vectors instead of another table); ``linear=False`` keeps the
    pairwise term alone. r is stored once per pair i < j, so it is symmetric by construction
    and has no diagonal; it starts at 1, where the pairwise term is an FM's.

    Args:
        num_fields: F (at least 2, or there is no pair).
        dim: k.
        linear: add w0 and the field linear terms.
    """

    def __init__(self, num_fields: int, dim: int, linear: bool = True):
        super().__init__()
        if num_fields < 2:
            raise ValueError(f"FwFM weighs pairs of fields and needs at least 2, got {num_fields}")
        self.num_fields = num_fields
        num_pairs = num_fields * (num_fields - 1) // 2
        self.pair_weights = nn.Parameter(torch.empty(num_pairs))  # r_ij, pairs in row-major i < j order
        self.linear = nn.Linear(num_fields * dim, 1) if linear else None
        # flat positions i*F + j of the pairs in the [F, F] Gram matrix; rebuilt, never saved
        self.register_buffer("pair_index", torch.empty(num_pairs, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """r = 1 and the pair index (also what materialising from meta calls; ``linear`` resets itself)."""
        rows, cols = torch.triu_indices(self.num_fields, self.num_fields, offset=1, device=self.pair_index.device)
        with torch.no_grad():
            self.pair_index.copy_(rows * self.num_fields + cols)
            self.pair_weights.fill_(1.0)

    def pairwise(self, fields: torch.Tensor) -> torch.Tensor:
        """``[B, F, k] -> [B, P]``: the weighted pair terms ``r_ij <v_i, v_j>``, pairs i < j row-major."""
        # one batched [B, F, k] x [B, k, F] product, then a gather of its upper triangle: twice the
        # pair products strictly needed, but one GEMM instead of P small dot products
        gram = torch.bmm(fields, fields.transpose(1, 2)).flatten(1)  # [B, F*F]
        return gram.index_select(1, self.pair_index) * self.pair_weights

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        out = self.pairwise(fields).sum(dim=1)
        if self.linear is not None:
            out = out + self.linear(fields.flatten(1))[:, 0]
        return out

    def field_pair_weights(self) -> torch.Tensor:
        """r as the symmetric ``[F, F]`` matrix it stands for (zero diagonal), for inspection."""
        full = self.pair_weights.new_zeros(self.num_fields * self.num_fields)
        full = full.index_put((self.pair_index,), self.pair_weights).view(self.num_fields, self.num_fields)
        return full + full.T
