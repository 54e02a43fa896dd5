"""Reusable building blocks shared by the models (shape letters: B batch, T tasks, E experts, D dim)."""

from lightning_mtr.nn.bottoms import BottomFactory, MixtureBottom, SharedInput, SharedMLP
from lightning_mtr.nn.experts import ExpertBank
from lightning_mtr.nn.mlp import MLP, last_layer_weights
from lightning_mtr.nn.towers import TaskTowers

__all__ = ["BottomFactory", "ExpertBank", "MLP", "MixtureBottom", "SharedInput", "SharedMLP",
           "TaskTowers", "last_layer_weights"]
