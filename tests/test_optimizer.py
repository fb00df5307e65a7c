"""GroupedAdamW: torch's fused AdamW with less host work per step, bit for bit the same."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dinov3_eo.ssl.optimizer import GroupedAdamW


def _groups(model: nn.Module) -> list[dict]:
    """Groups as the SSL stages make them: different lr and weight-decay multipliers, one with lr 0 (frozen)."""
    layers = list(model.children())
    return [{"params": [layers[0].weight], "lr": 1e-2, "weight_decay": 0.04},
            {"params": [layers[0].bias, layers[1].bias], "lr": 1e-2, "weight_decay": 0.0},
            {"params": [layers[1].weight], "lr": 5e-3, "weight_decay": 0.04},
            {"params": [layers[2].weight], "lr": 0.0, "weight_decay": 0.04}]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3, bias=False))


def _set_grads(models: list[nn.Module], step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for tensors in zip(*(m.parameters() for m in models)):
        grad = torch.randn(tensors[0].shape, generator=gen)
        for i, p in enumerate(tensors):
            # the last layer gets no gradient on odd steps: its state is made, and stepped, only when it has one
            p.grad = None if (step % 2 and p.shape == (3, 4)) else grad.clone()


def _assert_same(a: torch.optim.Optimizer, b: torch.optim.Optimizer, ma: nn.Module, mb: nn.Module) -> None:
    for p, q in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(p, q)
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]) and sa[key].dtype == sb[key].dtype, key


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.99)])
def test_steps_equal_torch_fused_adamw_bit_for_bit(betas: tuple[float, float]) -> None:
    mine, theirs = _model(), _model()
    ours = GroupedAdamW(_groups(mine), betas=betas)
    reference = torch.optim.AdamW(_groups(theirs), betas=betas, fused=True)
    for step in range(7):
        for opt in (ours, reference):  # a schedule changes the lrs every step
            for i, group in enumerate(opt.param_groups):
                group["lr"] = 0.0 if i == 3 and step < 4 else 1e-2 * (1 + 0.1 * step) * (0.5 if i == 2 else 1.0)
        _set_grads([mine, theirs], step)
        ours.step(), reference.step()
        _assert_same(ours, reference, mine, theirs)
    # checkpoints travel both ways: each continues as the other would
    swapped_mine, swapped_theirs = copy.deepcopy(mine), copy.deepcopy(theirs)
    into_torch = torch.optim.AdamW(_groups(swapped_mine), betas=betas, fused=True)
    into_torch.load_state_dict(copy.deepcopy(ours.state_dict()))  # (a state_dict holds the live tensors)
    into_ours = GroupedAdamW(_groups(swapped_theirs), betas=betas)
    into_ours.load_state_dict(copy.deepcopy(reference.state_dict()))
    _set_grads([swapped_mine, swapped_theirs, mine], 8)
    into_torch.step(), into_ours.step(), ours.step()
    _assert_same(into_torch, into_ours, swapped_mine, swapped_theirs)
    _assert_same(ours, into_ours, mine, swapped_theirs)


def test_closure_and_torchs_own_step_where_the_fast_path_does_not_apply() -> None:
    model = _model()
    opt = GroupedAdamW(_groups(model))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(torch.ones(2, 6)).sum()
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure)) and all(opt.state[p]["step"] == 1 for p in model.parameters())
    for options in ({"amsgrad": True}, {"maximize": True}):  # torch's own step, the same results
        mine, theirs = _model(), _model()
        ours, reference = GroupedAdamW(_groups(mine), **options), torch.optim.AdamW(_groups(theirs), fused=True, **options)
        for step in range(3):
            _set_grads([mine, theirs], step)
            ours.step(), reference.step()
        _assert_same(ours, reference, mine, theirs)
    mixed = nn.Linear(3, 2)
    mixed.bias.data = mixed.bias.data.double()  # two dtypes in one group: torch's step groups them
    opt = GroupedAdamW([{"params": list(mixed.parameters())}])
    for p in mixed.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert mixed.bias.dtype == torch.float64 and opt.state[mixed.bias]["step"] == 1


def test_state_replaced_between_steps_is_followed() -> None:
    """Moving an optimiser's state (as Lightning does to a device) replaces its tensors: the next step uses the new
    ones, as torch's own step would."""
    mine, theirs = _model(), _model()
    ours, reference = GroupedAdamW(_groups(mine)), torch.optim.AdamW(_groups(theirs), fused=True)
    _set_grads([mine, theirs], 0)
    ours.step(), reference.step()
    for state in ours.state.values():
        for key in state:
            state[key] = state[key].clone()  # new tensors, same values
    _set_grads([mine, theirs], 2)
    ours.step(), reference.step()
    _assert_same(ours, reference, mine, theirs)
