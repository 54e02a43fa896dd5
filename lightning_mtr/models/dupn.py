"""DUPN (Ni et al., KDD 2018, "Perceive Your Users in Depth: Learning Universal User
Representations from Multiple E-commerce Tasks").

Each behaviour of a user's sequence has an item part (item id, category, shop, brand, ...) and
a property part (behaviour type, scene, time gap). A property-gated LSTM reads the sequence, an
attention net conditioned on the query and the user weights its states into a behaviour
vector, and that vector next to a user vector (from the user's profile features) is the
universal user representation every downstream task shares (the paper: 128 + 128 = 256). Each
task's tower reads the representation and the row's other features (the candidate item, the
influencer, the context), so CTR, learning to rank, influencer following (FIFP) and
purchasing power (PPP, multi-class) come from one model, each on its own log.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from lightning_mtr.nn import MLP, FeatureInput, TaskTowers
from lightning_mtr.nn.sequence import BehaviourAttention, PropertyGatedLSTM, chronological
from lightning_mtr.schema import Schema


class DUPN(nn.Module):
    """``behaviours -> property-gated LSTM -> attention(query, user) ++ user vector -> {task: tower}``.

    Args:
        schema: features and tasks (linked from the data module); the sequence features are
            the schema's ``sequence: true`` ones.
        item_part: sequence features of a behaviour's item (their embeddings are concatenated).
        property_part: sequence features of a behaviour's property.
        user_features: pooled sparse features of the user profile, for the user vector; every
            other pooled feature (and the dense ones) is the query/context, and so is every
            sequence feature outside the behaviour, summed: the candidate item's fields as
            length-one sequences share the history's tables, as the paper shares embeddings.
        lstm_hidden: size of the LSTM state and of the behaviour vector (the paper: 128).
        user_dim: size of the user vector (the paper: 128).
        attention: hidden sizes of the attention MLP.
        tower: hidden sizes of each task tower.
        dropout: dropout in the towers.
    """

    def __init__(self, schema: Schema, item_part: Sequence[str], property_part: Sequence[str],
                 user_features: Sequence[str], lstm_hidden: int = 128, user_dim: int = 128,
                 attention: Sequence[int] = (64,), tower: Sequence[int] = (128, 64), dropout: float = 0.0):
        super().__init__()
        self.features = FeatureInput(schema)
        sequences = set(self.features.sequence_names)
        parts = {"item_part": list(item_part), "property_part": list(property_part)}
        for name, part in parts.items():
            if not part or not set(part) <= sequences:
                raise ValueError(f"DUPN: {name} must name sequence features of the schema ({sorted(sequences)}), "
                                 f"got {part}")
        self.item_part, self.property_part = parts["item_part"], parts["property_part"]
        self.user_features = list(user_features)
        unknown = sorted(set(self.user_features) - set(self.features.feature_names))
        if unknown or not self.user_features:
            raise ValueError(f"DUPN: user_features must name pooled sparse features ({self.features.feature_names}), "
                             f"unknown: {unknown}")
        self.query_features = [n for n in self.features.feature_names if n not in self.user_features]
        self.query_sequences = [n for n in self.features.sequence_names if n not in self.item_part + self.property_part]
        dim = _sequence_dim(schema)
        user_in = sum(self.features.field_dims[n] for n in self.user_features)
        # the dense features, every other pooled one and the summed sequences outside the behaviour
        query_in = self.features.output_dim - user_in + dim * len(self.query_sequences)
        self.user = MLP(user_in, [user_dim])
        self.lstm = PropertyGatedLSTM(dim * len(self.item_part), dim * len(self.property_part), lstm_hidden)
        self.attention = BehaviourAttention(lstm_hidden, dim * len(self.property_part), query_in + user_dim, attention)
        self.representation_dim = lstm_hidden + user_dim
        self.tasks = schema.task_names
        self.towers = TaskTowers(schema.task_outputs, self.representation_dim + query_in, tower, dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        features = self.features(dense, sparse)
        representation, query = self.user_representation(features, sparse)
        shared = torch.cat([representation, query], dim=1)
        return self.towers({task: shared for task in self.tasks})

    def user_representation(self, features: torch.Tensor, sparse: KeyedJaggedTensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(universal user representation [B, lstm_hidden + user_dim], query [B, Q])``."""
        user = self.user(self.features.columns(features, self.user_features))
        sequences = self.features.sequences(sparse)
        query = torch.cat([features[:, :self.features.dense_dim], self.features.columns(features, self.query_features),
                           *[sequences[n][0].sum(dim=1) for n in self.query_sequences]], dim=1)
        lengths = sequences[self.item_part[0]][1]
        parts = torch.stack([sequences[name][1] for name in self.item_part + self.property_part])
        torch._assert_async((parts == lengths).all(),  # checked without waiting for a GPU
                            f"DUPN: the sequences {self.item_part + self.property_part} differ in length on some row; "
                            "every part of a behaviour needs one entry per behaviour")
        items = chronological(torch.cat([sequences[n][0] for n in self.item_part], dim=2), lengths)
        properties = chronological(torch.cat([sequences[n][0] for n in self.property_part], dim=2), lengths)
        states = self.lstm(items, properties, lengths)
        behaviour, _ = self.attention(states, properties, torch.cat([query, user], dim=1), lengths)
        return torch.cat([behaviour, user], dim=1), query


def _sequence_dim(schema: Schema) -> int:
    """The one embedding size of the sequence features (the schema checks they share it)."""
    return next(f.embedding_dim for f in schema.sparse if f.sequence)
