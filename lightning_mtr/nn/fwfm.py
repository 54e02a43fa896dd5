"""FwFM (Pan et al., WWW 2018, "Field-weighted Factorization Machines for Click-Through Rate
Prediction in Display Advertising"): an FM whose every field pair (F, G) has its own learned
scalar weight r_FG.

The paper sums over pairs of *features* (active ids): ``sum_{i<j} r_{F(i),F(j)} <v_i, v_j>``.
A multi-hot field contributes each of its elements, so two fields meet through the sums of
their elements, ``r_FG <sum_{i in F} v_i, sum_{j in G} v_j>``, and the elements of one field
meet each other with a same-field weight r_FF:
``r_FF sum_{i<j in F} <v_i, v_j> = r_FF (||sum_F v||^2 - sum_{i in F} ||v_i||^2) / 2``. A
single-valued field has at most one element, so no same-field pair and no r_FF.

Shape letters: B batch, F fields (here: one per sparse feature, also when features share a
table), M the multi-hot fields among them, L the longest bag, k the one dim all field vectors
share, P = F(F-1)/2 field pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

MultiHot = Literal["sum", "mean"]  # a multi-hot field's vector: the sum of its elements (the paper) or their mean


class FieldVectors(nn.Module):
    """Pooled embeddings and bags of element embeddings -> field vectors ``[B, F, k]`` and each
    bag's sum of squared element norms ``[B, M]`` (the same-field term needs it).

    Fields are the pooled features first, then the bags. A pooled block is the field vector
    itself (single-valued, or as its table pools it); a bag (``FeatureInput.sequences``: padded
    elements and lengths) becomes the sum of its elements (``multi_hot="sum"``, the paper's) or
    their mean. Inner products need one k. ``dim=None``: every feature must already have it (no
    parameters); a schema whose features differ is refused, naming them. ``dim=k``: each field
    gets its own bias-free linear map from its ``embedding_dim`` to k, applied to every element
    (also for a field already of dim k, so that every field is treated alike).

    Args:
        pooled: ``{feature: embedding_dim}`` in the order of the pooled blocks (``FeatureInput.field_dims``).
        bags: ``{feature: embedding_dim}`` of the multi-hot fields read element by element.
        dim: k, or None to use the schema's common ``embedding_dim``.
        multi_hot: ``sum`` or ``mean`` of a bag's elements.
    """

    def __init__(self, pooled: Mapping[str, int], bags: Mapping[str, int] | None = None, dim: int | None = None,
                 multi_hot: MultiHot = "sum"):
        super().__init__()
        if multi_hot not in ("sum", "mean"):
            raise ValueError(f"multi_hot must be 'sum' (the paper's FwFM) or 'mean', got {multi_hot!r}")
        self.multi_hot = multi_hot
        dims = {**pooled, **(bags or {})}
        self.dims = list(pooled.values())
        if dim is None:
            by_dim: dict[int, list[str]] = {}
            for name, width in dims.items():
                by_dim.setdefault(width, []).append(name)
            if len(by_dim) > 1:
                found = "; ".join(f"embedding_dim {width}: {names}" for width, names in sorted(by_dim.items()))
                raise ValueError(f"FwFM takes inner products of field vectors, so every sparse feature needs the "
                                 f"same embedding_dim; the schema has {found}. Give them one embedding_dim, or "
                                 f"set field_dim to project each feature to a common dim")
            dim = next(iter(dims.values()), 0)
            self.projections = None
        else:
            self.projections = nn.ModuleList(nn.Linear(width, dim, bias=False) for width in dims.values())
        self.dim = dim

    def forward(self, pooled: torch.Tensor, bags: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pooled [B, sum of pooled dims]``, ``bags`` ``[(elements [B, L, D], lengths [B])]`` ->
        ``(fields [B, F, k], square_norms [B, M])``; M = number of bags under ``sum``, else 0."""
        blocks = list(pooled.split(self.dims, dim=1))
        vectors = [self._project(f, block) for f, block in enumerate(blocks)]
        norms = []
        for m, (elements, lengths) in enumerate(bags):
            elements = self._project(len(blocks) + m, elements)  # [B, L, k], zero past each row's length
            vectors.append(bag_vector(elements, lengths, self.multi_hot))
            if self.multi_hot == "sum":
                norms.append(elements.square().sum(dim=(1, 2)))
        square_norms = torch.stack(norms, dim=1) if norms else pooled.new_zeros(pooled.shape[0], 0)
        return torch.stack(vectors, dim=1), square_norms

    def _project(self, field: int, inputs: torch.Tensor) -> torch.Tensor:
        return inputs if self.projections is None else self.projections[field](inputs)


def bag_vector(elements: torch.Tensor, lengths: torch.Tensor, multi_hot: MultiHot) -> torch.Tensor:
    """``[B, L, D]`` elements (zero past each row's length) -> their sum or mean ``[B, D]``
    (an empty bag: zero)."""
    total = elements.sum(dim=1)
    return total if multi_hot == "sum" else total / lengths.clamp(min=1).unsqueeze(1).to(total.dtype)


class FwFM(nn.Module):
    """``fields [B, F, k], square_norms [B, M] -> [B]``: ``w0 + sum_F <v_F, w_F> +
    sum_{F<G} r_FG <v_F, v_G> + sum_{F multi-hot} r_FF (||v_F||^2 - q_F) / 2``.

    ``v_F`` is a field's vector (the sum of a multi-hot field's elements) and ``q_F`` the sum of
    its elements' squared norms, so the last term pairs a field's elements with each other
    (module docstring). The linear terms are the paper's FwFM_FiLV (one k-vector w_F per field,
    F*k parameters, read from the same field vectors instead of another table: for a multi-hot
    field, the sum of its elements' terms); ``linear=False`` keeps the pairwise terms alone. r is
    stored once per pair F < G, so it is symmetric by construction; the same-field weights exist
    for the ``same_field`` fields only. All start at 1, where the pairwise terms are an FM's over
    every element.

    Args:
        num_fields: F (at least 2, or there is no pair).
        dim: k.
        linear: add w0 and the field linear terms.
        same_field: indices of the multi-hot fields whose elements pair with each other (M of them).
    """

    def __init__(self, num_fields: int, dim: int, linear: bool = True, same_field: Sequence[int] = ()):
        super().__init__()
        if num_fields < 2:
            raise ValueError(f"FwFM weighs pairs of fields and needs at least 2, got {num_fields}")
        self.num_fields = num_fields
        num_pairs = num_fields * (num_fields - 1) // 2
        self.pair_weights = nn.Parameter(torch.empty(num_pairs))  # r_FG, pairs in row-major F < G order
        self.same_field = list(same_field)
        # r_FF, in same_field order; none without multi-hot fields (single-valued ones have no same-field pair)
        self.same_field_weights = nn.Parameter(torch.empty(len(self.same_field))) if self.same_field else None
        # the same fields as an index on the device, so a step copies no index from the host
        self.register_buffer("same_field_index", torch.empty(len(self.same_field), dtype=torch.long), persistent=False)
        self.linear = nn.Linear(num_fields * dim, 1) if linear else None
        # flat positions F*num_fields + G of the pairs in the [F, F] Gram matrix; rebuilt, never saved
        self.register_buffer("pair_index", torch.empty(num_pairs, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """r = 1 and the pair index (also what materialising from meta calls; ``linear`` resets itself)."""
        rows, cols = torch.triu_indices(self.num_fields, self.num_fields, offset=1, device=self.pair_index.device)
        with torch.no_grad():
            self.pair_index.copy_(rows * self.num_fields + cols)
            self.same_field_index.copy_(torch.tensor(self.same_field, dtype=torch.long))
            self.pair_weights.fill_(1.0)
            if self.same_field_weights is not None:
                self.same_field_weights.fill_(1.0)

    def pairwise(self, fields: torch.Tensor) -> torch.Tensor:
        """``[B, F, k] -> [B, P]``: the weighted cross-field terms ``r_FG <v_F, v_G>``, F < G row-major."""
        # one batched [B, F, k] x [B, k, F] product, then a gather of its upper triangle: twice the
        # pair products strictly needed, but one GEMM instead of P small dot products
        gram = torch.bmm(fields, fields.transpose(1, 2)).flatten(1)  # [B, F*F]
        return gram.index_select(1, self.pair_index) * self.pair_weights

    def within(self, fields: torch.Tensor, square_norms: torch.Tensor) -> torch.Tensor:
        """``[B, M]``: ``r_FF sum_{i<j in F} <v_i, v_j>`` of each multi-hot field."""
        total = fields.index_select(1, self.same_field_index).square().sum(dim=-1)
        return self.same_field_weights * (total - square_norms) / 2

    def forward(self, fields: torch.Tensor, square_norms: torch.Tensor | None = None) -> torch.Tensor:
        out = self.pairwise(fields).sum(dim=1)
        if self.same_field:
            if square_norms is None or square_norms.shape[1] != len(self.same_field):
                raise ValueError(f"FwFM pairs the elements of {len(self.same_field)} multi-hot fields and needs their "
                                 "sums of squared element norms [B, M] (FieldVectors returns them)")
            out = out + self.within(fields, square_norms).sum(dim=1)
        if self.linear is not None:
            out = out + self.linear(fields.flatten(1))[:, 0]
        return out

    def field_pair_weights(self) -> torch.Tensor:
        """r as the symmetric ``[F, F]`` matrix it stands for, for inspection: the diagonal holds
        r_FF of the multi-hot fields and 0 for the others (no same-field pair)."""
        full = self.pair_weights.new_zeros(self.num_fields * self.num_fields)
        full = full.index_put((self.pair_index,), self.pair_weights).view(self.num_fields, self.num_fields)
        diagonal = self.pair_weights.new_zeros(self.num_fields)
        if self.same_field_weights is not None:
            diagonal = diagonal.index_put((self.same_field_index,), self.same_field_weights)
        return full + full.T + torch.diag(diagonal)
