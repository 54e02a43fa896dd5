"""Model zoo: output keys and shapes, gradient flow, and each paper's defining structure."""

from __future__ import annotations

import pytest
import torch

from helpers import ESM2_TASKS, ESMM_TASKS, random_inputs, tiny_schema
from lightning_mtr.models import MODELS, MMoE, OMoE, SharedBottom, build_model
from lightning_mtr.kernels.gate_mix import gate_mix
from lightning_mtr.nn import ExpertBank, MixtureBottom, SharedInput, SharedMLP

SMALL = {
    "aitm": {"tower": [8], "ait_dim": 4},
    "mmoe": {"num_experts": 3, "expert": [8, 6], "tower": [16]},
    "omoe": {"num_experts": 3, "expert": [8, 6], "tower": [16]},
    "shared_bottom": {"bottom": [8, 6], "tower": [16]},
    "esmm": {"tower": [8, 6]},
    "esm2": {"tower": [8, 6]},
    "nfwfm": {"hidden": [8, 6], "tower": [16], "multi_hot": "mean"},  # tiny_schema's item bag is pooled by its table
    "ple": {"num_levels": 2, "task_experts": 1, "shared_experts": 2, "expert": [8, 6], "tower": [16]},
    "youtube": {"engagement": ["ctr"], "position_features": ["user"], "shared": [8], "num_experts": 2,
                "expert": [6], "tower": [4]},
    "dupn": {"item_part": ["hist_item"], "property_part": ["hist_type"], "user_features": ["user"], "lstm_hidden": 4,
             "user_dim": 4, "attention": [4], "tower": [4]},
}
TASKS = {"esmm": ESMM_TASKS, "esm2": ESM2_TASKS}  # the others take any tasks


def _schema(name: str):
    return tiny_schema(tasks=TASKS.get(name, ("ctr", "cvr", "ctcvr")), sequences=name == "dupn")


def test_registry_is_literal_and_complete():
    assert set(MODELS) == set(SMALL)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope", tiny_schema())


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("batch", [1, 7])
def test_outputs_are_one_logit_per_task_and_row(name, batch):
    schema = _schema(name)
    model = build_model(name, schema, **SMALL[name])
    logits = model(*random_inputs(schema, batch))
    assert sorted(logits) == sorted(schema.task_names)
    for value in logits.values():
        assert value.shape == (batch,)  # batch size 1 keeps its batch dimension
        assert torch.isfinite(value).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    schema = _schema(name)
    model = build_model(name, schema, **SMALL[name])
    dense, sparse = random_inputs(schema, 256)  # enough rows that no small ReLU layer starts all dead
    sum(logit.square().sum() for logit in model(dense, sparse).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_expert_bank_equals_independent_experts():
    torch.manual_seed(0)
    bank = ExpertBank(in_dim=5, num_experts=3, hidden=[4, 2])
    inputs = torch.randn(6, 5)
    out = bank(inputs)
    assert out.shape == (6, 3, 2)
    first_w = bank.first.weight.view(3, 4, 5)
    first_b = bank.first.bias.view(3, 4)
    for e in range(3):
        hidden = torch.relu(inputs @ first_w[e].T + first_b[e])
        expected = torch.relu(hidden @ bank.weights[0][e] + bank.biases[0][e, 0])
        torch.testing.assert_close(out[:, e], expected)


def test_gate_mix_is_softmax_weighted_sum():
    experts = torch.randn(4, 3, 2)
    gate_logits = torch.randn(4, 2, 3)
    weights = torch.softmax(gate_logits, -1)
    expected = torch.einsum("bte,bed->btd", weights, experts)
    torch.testing.assert_close(gate_mix(experts, gate_logits), expected)


def _gate_count(model) -> int:
    return model.bottom.gates.out_features // model.bottom.experts.num_experts


def test_mmoe_has_one_gate_per_task_and_omoe_one_shared_gate():
    schema = tiny_schema(tasks=("a", "b", "c"))
    assert _gate_count(MMoE(schema, num_experts=4, expert=[6])) == 3
    assert _gate_count(OMoE(schema, num_experts=4, expert=[6])) == 1


@pytest.mark.parametrize("gate_bias", [False, True], ids=["paper", "gate_bias"])
def test_mixture_gates_are_softmax_of_w_x_as_in_the_paper(gate_bias):
    """MMoE's f^k(x) = sum_e softmax(W_gk x)_e f_e(x) (Ma et al., eq. 5-6): no gate bias unless
    asked for; gate k, expert e and the mixture recomputed here from the weights."""
    torch.manual_seed(0)
    tasks, experts, in_dim, hidden = 2, 3, 5, 4
    bottom = MixtureBottom(in_dim, tasks, num_experts=experts, expert=[hidden], gate_bias=gate_bias)
    assert (bottom.gates.bias is not None) == gate_bias
    assert ("gates.bias" in bottom.state_dict()) == gate_bias
    with torch.no_grad():  # far from uniform gates; a bias large enough to matter
        bottom.gates.weight.mul_(5)
        if gate_bias:
            bottom.gates.bias.copy_(3 * torch.randn(tasks * experts))
    x = torch.randn(7, in_dim)
    first_w = bottom.experts.first.weight.view(experts, hidden, in_dim)
    first_b = bottom.experts.first.bias.view(experts, hidden)
    f = [torch.relu(x @ first_w[e].T + first_b[e]) for e in range(experts)]  # [B, D] each
    gate_w = bottom.gates.weight.view(tasks, experts, in_dim)
    gate_b = bottom.gates.bias.view(tasks, experts) if gate_bias else torch.zeros(tasks, experts)
    out = bottom(x)
    for k in range(tasks):
        g = torch.softmax(x @ gate_w[k].T + gate_b[k], dim=-1)  # [B, E]
        torch.testing.assert_close(out[k], sum(g[:, e, None] * f[e] for e in range(experts)))


@pytest.mark.parametrize("bottom, shares_one", [
    (SharedInput(6, 3), True), (SharedMLP(6, 3, hidden=[4]), True),
    (MixtureBottom(6, 3, num_experts=2, expert=[4], one_gate=True), True),
    (MixtureBottom(6, 3, num_experts=2, expert=[4]), False)], ids=["input", "mlp", "one_gate", "gate_per_branch"])
def test_bottoms_give_one_tensor_per_branch_and_a_shared_one_by_identity(bottom, shares_one):
    """A representation every branch reads is one tensor, given to each branch: autograd adds the branches'
    gradients into it in place (an expanded view's backward stacks them and sums). The input's gradient
    is then that of the one representation against the sum of the branches' upstream gradients."""
    torch.manual_seed(0)
    x = torch.randn(5, 6, requires_grad=True)
    branches = bottom(x)
    assert isinstance(branches, tuple) and len(branches) == 3
    assert all(b.shape == (5, bottom.output_dim) for b in branches)
    assert (len({id(b) for b in branches}) == 1) == shares_one
    if not shares_one:
        return
    upstream = [torch.randn(5, bottom.output_dim) for _ in branches]
    sum((b * g).sum() for b, g in zip(branches, upstream)).backward()
    # the input itself: the upstream sum, by hand; else one representation against that sum
    expected = sum(upstream) if isinstance(bottom, SharedInput) else torch.autograd.grad(
        (bottom(x)[0] * sum(upstream)).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("model", [MMoE, OMoE])
def test_mmoe_and_omoe_gates_have_no_bias_by_default(model):
    schema = tiny_schema(tasks=("a", "b"))
    assert model(schema, num_experts=3, expert=[6]).bottom.gates.bias is None
    assert model(schema, num_experts=3, expert=[6], gate_bias=True).bottom.gates.bias is not None


def test_mmoe_task_output_follows_its_own_gate():
    """Zeroing one task's gate weights changes only that task's mixture, hence only its logit."""
    schema = tiny_schema(tasks=("a", "b"))
    torch.manual_seed(0)
    model = MMoE(schema, num_experts=3, expert=[6], tower=[4]).eval()
    inputs = random_inputs(schema, 5)
    before = model(*inputs)
    with torch.no_grad():
        model.bottom.gates.weight[:3] += 5 * torch.randn(3, model.bottom.gates.in_features)  # task "a"'s gate rows
    after = model(*inputs)
    assert not torch.allclose(before["a"], after["a"])
    torch.testing.assert_close(before["b"], after["b"])


def test_shared_bottom_towers_split_only_after_the_shared_layers():
    schema = tiny_schema(tasks=("a", "b"))
    torch.manual_seed(0)
    model = SharedBottom(schema, bottom=[8], tower=[4]).eval()
    inputs = random_inputs(schema, 5)
    before = model(*inputs)
    with torch.no_grad():
        for parameter in model.towers.towers["a"].parameters():
            parameter.add_(1.0)
    after = model(*inputs)
    assert not torch.allclose(before["a"], after["a"])
    torch.testing.assert_close(before["b"], after["b"])
    with torch.no_grad():  # the bottom is shared: changing it moves every task
        model.bottom.mlp[0].weight.add_(0.5)
    moved = model(*inputs)
    assert not torch.allclose(after["a"], moved["a"]) and not torch.allclose(after["b"], moved["b"])


def test_shared_table_is_one_table():
    model = MMoE(tiny_schema(), num_experts=2, expert=[4])
    tables = [c.name for c in model.features.embeddings.embedding_bag_configs()]
    assert tables == ["user", "item"]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_models_build_on_the_meta_device(name):
    """Large tables are planned before they are materialised: building on meta allocates nothing."""
    with torch.device("meta"):
        model = build_model(name, _schema(name), **SMALL[name])
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_materialising_from_meta_resets_every_owner_itself():
    """A parent whose reset covers only its own parameter must not count as resetting its
    child; a module with no reset of its own and no resetting parent is refused."""
    from torch import nn

    from lightning_mtr.nn.meta import materialize

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.empty(3))
            self.child = nn.Linear(4, 4)

        def reset_parameters(self):
            nn.init.ones_(self.scale)

    with torch.device("meta"):
        parent = Parent()
    materialize(parent, "cpu")
    assert torch.equal(parent.scale, torch.ones(3))
    assert parent.child.weight.abs().max() <= 0.5, "the child Linear ran its own default init"

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(2))

    with torch.device("meta"):
        bare = nn.Sequential(Bare())
    with pytest.raises(TypeError, match="reset_parameters"):
        materialize(bare, "cpu")
