"""DUPN (Ni et al., KDD 2018, "Perceive Your Users in Depth: Learning Universal User
Representations from Multiple E-commerce Tasks").

Each behaviour of a user's sequence has an item part (item id, category, shop, brand, ...) and
a property part (behaviour type, scene, time gap). A property-gated LSTM reads the sequence, an
attention net conditioned on the query and the user weights its states into a behaviour vector
``rep_s``, and ``rep = [rep_s; u]`` next to a user vector ``u`` (from the profile) is the
universal user representation every task shares (the paper: 128 + 128 = 256). ``rep`` reads
only the request (the schema's ``side: user`` features): the candidate item enters the heads
alone, so serving computes ``rep`` once per request and scores many candidates
(:meth:`DUPN.user_representation`, then :meth:`DUPN.score`), as the paper's section 7 does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from lightning_mtr.embeddings import FeatureInput
from lightning_mtr.nn import MLP, TaskTowers
from lightning_mtr.nn.sequence import BehaviourAttention, PropertyGatedLSTM, chronological
from lightning_mtr.nn.towers import FeatureWeightedScore
from lightning_mtr.schema import Schema

Sequences = dict[str, tuple[torch.Tensor, torch.Tensor]]


class DUPN(nn.Module):
    """``behaviours -> property-gated LSTM -> attention(query, user) ++ user vector = rep``, then
    per task a head on ``rep`` and the candidate's features (the paper's section 5):

    * an MLP head, ``MLP([rep, item features]) -> logits``: CTR with the item's embeddings,
      FIFP with the followed account's, PPP with none (``rep`` alone);
    * a ranking head, ``score_i = weight(rep)^T r_i`` over dense ranking features ``r_i`` (L2R).

    Args:
        schema: features and tasks (linked from the data module). Features tagged ``side: item``
            describe the candidate and reach only the heads that name them; every other feature
            describes the request: the behaviour parts, the user profile and the query/context
            (the remaining ``side: user`` features: dense, pooled, and sequences summed).
        item_part: sequence features of a behaviour's item (their embeddings are concatenated).
        property_part: sequence features of a behaviour's property. Both empty: the ablation
            without the behaviour sequence (conf/models/dupn_no_sequence.yaml), where an MLP over
            the query/context features takes the place of LSTM and attention, at the same width.
        user_features: pooled sparse features of the user profile, for the user vector.
        heads: ``{task: [item-side features]}`` that each MLP head reads next to ``rep``; a task
            named neither here nor in ``ranking_features`` reads ``rep`` alone.
        ranking_features: ``{task: [dense item-side features r_i]}``: these one-logit tasks get the
            ranking head ``weight(rep)^T r_i``.
        lstm_hidden: size of the LSTM state and of the behaviour vector (the paper: 128).
        user_dim: size of the user vector (the paper: 128).
        attention: hidden sizes of the attention MLP.
        tower: hidden sizes of each head's MLP (the paper: one layer of 128), and of ``weight``.
        dropout: dropout in the heads.
    """

    def __init__(self, schema: Schema, item_part: Sequence[str], property_part: Sequence[str],
                 user_features: Sequence[str], heads: Mapping[str, Sequence[str]] | None = None,
                 ranking_features: Mapping[str, Sequence[str]] | None = None, lstm_hidden: int = 128,
                 user_dim: int = 128, attention: Sequence[int] = (64,), tower: Sequence[int] = (128,),
                 dropout: float = 0.0):
        super().__init__()
        self.features = FeatureInput(schema)
        self.item_part, self.property_part = list(item_part), list(property_part)
        self.user_features = list(user_features)
        self.head_features, self.ranking_features = _check(schema, self.features, self.item_part, self.property_part,
                                                           self.user_features, heads or {}, ranking_features or {})
        parts = set(self.item_part + self.property_part + self.user_features)
        self.query_features = [n for n in schema.features_on_side("user") if n not in parts]
        width = self.features.widths
        query_in = width(self.query_features)
        self.user = MLP(width(self.user_features), [user_dim])
        if self.item_part:
            self.lstm = PropertyGatedLSTM(width(self.item_part), width(self.property_part), lstm_hidden)
            self.attention = BehaviourAttention(lstm_hidden, width(self.property_part), query_in + user_dim, attention)
        else:
            self.request = MLP(query_in, [lstm_hidden])
        self.representation_dim = lstm_hidden + user_dim
        self.tasks = schema.task_names
        self.towers = TaskTowers({t: schema.task_outputs[t] for t in self.head_features},
                                 {t: self.representation_dim + width(f) for t, f in self.head_features.items()},
                                 tower, dropout)
        self.rankers = nn.ModuleDict({t: FeatureWeightedScore(self.representation_dim, len(f), tower, dropout)
                                      for t, f in self.ranking_features.items()})

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        inputs = self._lookup(dense, sparse)
        return self._heads(self._representation(*inputs), *inputs)

    def user_representation(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """``rep = [rep_s; u]`` ``[B, lstm_hidden + user_dim]``, from the request's features only."""
        return self._representation(*self._lookup(dense, sparse))

    def score(self, representation: torch.Tensor, dense: torch.Tensor, sparse: KeyedJaggedTensor
              ) -> dict[str, torch.Tensor]:
        """``{task: logits}`` of the candidates in ``(dense, sparse)`` (only their item-side
        features are read) for ``representation`` ``[B, R]``, or ``[1, R]`` for all of them."""
        return self._heads(representation, *self._lookup(dense, sparse))

    def _lookup(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, Sequences]:
        return self.features(dense, sparse), self.features.sequences(sparse)

    def _representation(self, features: torch.Tensor, sequences: Sequences) -> torch.Tensor:
        gather = self.features.gather
        user = self.user(gather(features, sequences, self.user_features))
        query = gather(features, sequences, self.query_features)
        if not self.item_part:
            return torch.cat([self.request(query), user], dim=1)
        lengths = sequences[self.item_part[0]][1]
        parts = torch.stack([sequences[name][1] for name in self.item_part + self.property_part])
        torch._assert_async((parts == lengths).all(),  # checked without waiting for a GPU
                            f"DUPN: the sequences {self.item_part + self.property_part} differ in length on some row; "
                            "every part of a behaviour needs one entry per behaviour")
        items = chronological(torch.cat([sequences[n][0] for n in self.item_part], dim=2), lengths)
        properties = chronological(torch.cat([sequences[n][0] for n in self.property_part], dim=2), lengths)
        states = self.lstm(items, properties, lengths)
        behaviour, _ = self.attention(states, properties, torch.cat([query, user], dim=1), lengths)
        return torch.cat([behaviour, user], dim=1)

    def _heads(self, representation: torch.Tensor, features: torch.Tensor, sequences: Sequences
               ) -> dict[str, torch.Tensor]:
        representation = representation.expand(features.shape[0], -1)
        gather = self.features.gather
        logits = self.towers({task: torch.cat([representation, gather(features, sequences, names)], dim=1)
                              for task, names in self.head_features.items()})
        logits |= {task: ranker(representation, gather(features, sequences, self.ranking_features[task]))
                   for task, ranker in self.rankers.items()}
        return {task: logits[task] for task in self.tasks}


def _check(schema: Schema, features: FeatureInput, item_part: list[str], property_part: list[str],
           user_features: list[str], heads: Mapping[str, Sequence[str]],
           ranking_features: Mapping[str, Sequence[str]]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Refuse parts and heads that would not make the paper's model; ``-> (MLP heads, ranking heads)``."""
    user_side, item_side = set(schema.features_on_side("user")), set(schema.features_on_side("item"))
    sequences, pooled = set(features.sequence_names), set(features.feature_names)
    if bool(item_part) != bool(property_part):
        raise ValueError("DUPN: item_part and property_part are both set (a behaviour's item and its property) or "
                         f"both empty (the ablation without the sequence); got {item_part} and {property_part}")
    for name, part, kind in (("item_part", item_part, sequences), ("property_part", property_part, sequences),
                             ("user_features", user_features, pooled)):
        what = "sequence" if kind is sequences else "pooled sparse"
        if (not part and kind is pooled) or not set(part) <= kind & user_side:
            raise ValueError(f"DUPN: {name} must name {what} features of the schema's request side (side: user): "
                             f"{sorted(kind & user_side)}; got {part}")
    tasks = set(schema.task_names)
    for name, config in (("heads", heads), ("ranking_features", ranking_features)):
        unknown = sorted(set(config) - tasks)
        if unknown:
            raise ValueError(f"DUPN: {name} names tasks {unknown} that the schema does not have ({sorted(tasks)})")
        for task, names in config.items():
            wrong = [n for n in names if n not in item_side]
            if wrong:
                raise ValueError(f"DUPN: {name}[{task!r}] reads {wrong}, which are not candidate features: a head "
                                 f"reads features tagged `side: item` in the schema ({sorted(item_side)}); the "
                                 "request's features reach every head through rep")
    both = sorted(set(heads) & set(ranking_features))
    if both:
        raise ValueError(f"DUPN: tasks {both} are in both heads and ranking_features; a task has one head")
    for task, names in ranking_features.items():
        not_dense = [n for n in names if n not in features.dense_names]
        if not names or not_dense or schema.task_outputs[task] != 1:
            raise ValueError(f"DUPN: ranking_features[{task!r}] must list dense features (r_i) of a one-logit task; "
                             f"not dense: {not_dense}, dense ones: {features.dense_names}")
    mlp = {task: list(heads.get(task, ())) for task in schema.task_names if task not in ranking_features}
    return mlp, {task: list(names) for task, names in ranking_features.items()}
