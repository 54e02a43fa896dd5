"""Every hook a registered model, block or task weighting defines has its protocol's signature
(``lightning_mtr/interfaces.py``), so the trainer, diagnostics, meta initialisation and
serving can call it as documented."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from lightning_mtr import interfaces
from lightning_mtr.models import MODELS, build_model
from lightning_mtr.tasks import weighting

from test_models import SMALL, _schema

PROTOCOLS = [p for _, p in inspect.getmembers(interfaces, inspect.isclass)
             if p.__module__ == interfaces.__name__ and getattr(p, "_is_protocol", False)]
HOOKS = {name: protocol for protocol in PROTOCOLS for name, member in vars(protocol).items()
         if inspect.isfunction(member) and not name.startswith("_")}
MODEL_LEVEL = (interfaces.ForwardWithLosses, interfaces.LabelOrder, interfaces.UserItemSplit)


def _shape(function) -> list[tuple[str, inspect._ParameterKind]]:
    """Names and kinds of the parameters, ``self`` left out."""
    params = list(inspect.signature(function).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [(p.name, p.kind) for p in params]


def mismatches(obj: object, protocols=PROTOCOLS) -> list[str]:
    """Why ``obj`` does not implement the protocols of the hooks it defines (empty when it does)."""
    problems = []
    for name, protocol in HOOKS.items():
        hook = getattr(obj, name, None)
        if protocol not in protocols or not inspect.ismethod(hook):
            continue  # e.g. an attention block's ``score`` layer is no hook
        if not isinstance(obj, protocol):
            problems.append(f"{type(obj).__name__} defines {name} but not all of {protocol.__name__}")
        wanted = _shape(getattr(protocol, name))
        if _shape(hook) != wanted:
            taken = ", ".join(n for n, _ in _shape(hook))
            problems.append(f"{type(obj).__name__}.{name}({taken}) should take ({', '.join(n for n, _ in wanted)})")
    return problems


def test_protocols_cover_the_documented_hooks():
    assert {"forward_with_losses", "label_order", "gate_weights", "reset_parameters", "user_representation",
            "score", "attach", "end_epoch"} <= set(HOOKS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registered_models_match_the_protocols_of_their_hooks(name):
    model = build_model(name, _schema(name), **SMALL[name])
    problems = mismatches(model, MODEL_LEVEL)
    for module in model.modules():  # blocks: gates, and what meta initialisation resets
        problems += mismatches(module, (interfaces.GatedBlock, interfaces.Resettable))
    assert not problems


def test_models_that_define_hooks_are_seen_as_implementing_them():
    """The check above sees the hooks that exist today (it cannot pass by finding none)."""
    schema = {name: _schema(name) for name in ("esmm", "aitm", "dupn", "mmoe")}
    built = {name: build_model(name, schema[name], **SMALL[name]) for name in schema}
    assert isinstance(built["esmm"], interfaces.ForwardWithLosses) and isinstance(built["esmm"], interfaces.LabelOrder)
    assert isinstance(built["aitm"], interfaces.ForwardWithLosses)
    assert isinstance(built["dupn"], interfaces.UserItemSplit)
    assert isinstance(built["mmoe"].bottom, interfaces.GatedBlock)
    assert not isinstance(built["mmoe"], interfaces.ForwardWithLosses)


@pytest.mark.parametrize("scheme", [c for _, c in inspect.getmembers(weighting, inspect.isclass)
                                    if issubclass(c, weighting.TaskWeighting)], ids=lambda c: c.__name__)
def test_task_weightings_match_the_weighting_hooks(scheme):
    assert isinstance(scheme.__new__(scheme), interfaces.WeightingHooks)
    assert not mismatches(scheme.__new__(scheme), (interfaces.WeightingHooks,))


class _LostLabels(nn.Module):
    def forward_with_losses(self, dense: torch.Tensor, sparse):
        return {}, {}, {}


class _RenamedEpochLosses:
    def attach(self, model: nn.Module) -> None:
        pass

    def end_epoch(self, losses: Mapping[str, float], epoch: int) -> None:
        pass


class _HalfSplit(nn.Module):
    def score(self, representation, dense, sparse):
        return {}


def test_a_hook_with_the_wrong_arguments_is_found():
    assert mismatches(_LostLabels()) == [
        "_LostLabels.forward_with_losses(dense, sparse) should take (dense, sparse, labels)"]
    assert mismatches(_RenamedEpochLosses()) == [
        "_RenamedEpochLosses.end_epoch(losses, epoch) should take (epoch_losses)"]
    assert mismatches(_HalfSplit()) == ["_HalfSplit defines score but not all of UserItemSplit"]
