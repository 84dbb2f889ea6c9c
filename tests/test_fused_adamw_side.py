"""fused_adamw_side: AdamW-side matrices are updated in their gradient hooks, so their gradients never coexist.

Exact against the step-time AdamW side with gradient accumulation (without clipping), with an exact logged norm;
with clipping the hooked updates use the previous step's coefficient (documented), the matrices this step's.
"""

import io

import pytest
import torch
from ddp_helpers import run_on_ranks, window_backward
from torch import nn

from mofasgd import MoFaSGD, split_for_mofasgd

ACCUM, STEPS = 2, 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(self.embed(ids))))


def make(fused_side, adamw_state="full", data_parallel=False):
    """(model, optimizer, its AdamW-side params)."""
    model = Net()
    routing = split_for_mofasgd(model)
    groups = [
        {"params": [p for _, p in routing.mofasgd]},
        {"params": [p for _, p in routing.adamw], "mofasgd": False, "lr": 1e-2, "weight_decay": 0.1},
    ]
    opt = MoFaSGD(
        groups, lr=0.05, rank=2, fused_adamw_side=fused_side, adamw_state=adamw_state, data_parallel=data_parallel
    )
    return model, opt, [p for _, p in routing.adamw]


def batch(step, micro):
    gen = torch.Generator().manual_seed(10 * step + micro)
    return torch.randint(0, 20, (6,), generator=gen), torch.randint(0, 20, (6,), generator=gen)


def train(model, opt, clip=None, alive=None, side=()):
    norms = []
    for step in range(STEPS):
        for micro in range(ACCUM):
            opt.accumulating = micro < ACCUM - 1
            ids, target = batch(step, micro)
            nn.functional.cross_entropy(model(ids), target).div(ACCUM).backward()
            if alive is not None:
                alive.append(sum(p.grad is not None for p in side))
        norms.append(float(opt.clip_grad_norm_(clip) if clip else opt.grad_norm()))
        opt.step()
        opt.zero_grad()
    return norms


@pytest.mark.parametrize("adamw_state", ["full", "factored"])
def test_fused_adamw_side_equals_the_step_time_update_with_accumulation(adamw_state):
    reference, ref_opt, _ = make(False, adamw_state)
    ref_norms = train(reference, ref_opt)
    model, opt, side = make(True, adamw_state)
    alive = []
    matrices = [p for p in side if p.dim() == 2]  # the embedding; the bias (a vector) is updated at step()
    norms = train(model, opt, alive=alive, side=matrices)
    assert norms == pytest.approx(ref_norms, rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=name)
        assert not torch.equal(p, Net().state_dict()[name]), name  # it trained
    # after an accumulating backward the AdamW side still holds its gradients; after the last one, none
    assert matrices and alive == [len(matrices), 0] * STEPS


def test_the_accumulation_boundary_can_come_from_a_callable():
    reference, ref_opt, _ = make(False)
    train(reference, ref_opt)
    model, opt, _ = make(True)
    micro = {"index": 0}
    opt.accumulation_boundary = lambda: micro["index"] == ACCUM - 1
    for step in range(STEPS):
        for index in range(ACCUM):
            micro["index"] = index
            ids, target = batch(step, index)
            nn.functional.cross_entropy(model(ids), target).div(ACCUM).backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_with_clipping_the_norm_is_exact_and_hooked_updates_use_the_previous_coefficient():
    reference, ref_opt, _ = make(False)
    model, opt, side = make(True)
    ids, target = batch(0, 0)
    for net in (reference, model):
        nn.functional.cross_entropy(net(ids), target).backward()
    norm = float(opt.clip_grad_norm_(1e-3))
    assert norm == pytest.approx(float(ref_opt.clip_grad_norm_(1e-3)), rel=1e-6) and norm > 1e-3
    opt.step()
    ref_opt.step()
    # first step: no previous coefficient, so the AdamW side took the unclipped gradient (Adam's first step is
    # sign-like, so it moves as far as the clipped reference); the managed matrix took the clipped one
    torch.testing.assert_close(model.hidden.weight, reference.hidden.weight, atol=1e-6, rtol=1e-6)
    assert opt._side_clip_coef == pytest.approx(1e-3 / norm, rel=1e-4)


def test_fused_adamw_side_needs_fused_mode():
    with pytest.raises(ValueError, match="fused_adamw_side=True .* needs fused=True"):
        MoFaSGD([nn.Parameter(torch.randn(2, 2))], fused_adamw_side=True, fused=False)


def ddp_run(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    from mofasgd.data_parallel import ignore_managed_in_ddp

    model, opt, side = make(True, data_parallel=True)
    managed = opt.param_groups[0]["params"]
    ignore_managed_in_ddp(model, managed + [p for p in side if p.dim() == 2])
    ddp = DistributedDataParallel(model)
    for step in range(STEPS):
        for micro in range(ACCUM):
            opt.accumulating = micro < ACCUM - 1
            ids, target = batch(step, micro)
            half = slice(rank * 3, rank * 3 + 3)
            loss = nn.functional.cross_entropy(ddp(ids[half]), target[half]).div(ACCUM)
            window_backward(ddp, loss, last=not opt.accumulating)
        opt.clip_grad_norm_(0.5)
        opt.step()
        opt.zero_grad()
    return model.state_dict()


@pytest.mark.distributed
def test_fused_adamw_side_under_ddp_averages_in_its_hooks_and_equals_one_process():
    """The AdamW-side matrices are left out of DDP and averaged in their hooks; the norms stay with DDP."""
    result = run_on_ranks(ddp_run)
    model, opt, side = make(True)
    assert any(p.dim() == 2 for p in side) and any(p.dim() == 1 for p in side)
    train(model, opt, clip=0.5)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(result[name], value, atol=1e-5, rtol=1e-5, msg=name)


def test_a_resume_keeps_the_clipping_coefficient_of_the_hooked_updates():
    """With clipping active, the resumed run's first hooked updates use the saved coefficient: an exact resume."""

    def more_steps(net, optimizer):
        for step in range(STEPS, STEPS + 2):
            ids, target = batch(step, 0)
            nn.functional.cross_entropy(net(ids), target).backward()
            optimizer.clip_grad_norm_(0.01)
            optimizer.step()
            optimizer.zero_grad()

    model, opt, _ = make(True)
    train(model, opt, clip=0.01)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    coefs = {g["mofasgd_side_clip_coef"] for g in saved["param_groups"]}  # in the groups: DCP keeps those
    assert len(coefs) == 1 and coefs.pop() < 1.0  # clipping was active
    more_steps(model, opt)  # the uninterrupted run
    resumed, fresh, _ = make(True)
    resumed.load_state_dict(weights)
    fresh.load_state_dict(saved)
    assert all("mofasgd_side_clip_coef" not in g for g in fresh.param_groups)  # not left as a hyper-parameter
    more_steps(resumed, fresh)
    for p, q in zip(resumed.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_a_checkpoint_with_the_clipping_coefficient_at_the_top_level_still_loads():
    """Checkpoints written before the coefficient moved into the param groups kept it beside them."""
    model, opt, _ = make(True)
    train(model, opt, clip=0.01)
    saved = opt.state_dict()
    coef = saved["param_groups"][0].pop("mofasgd_side_clip_coef")
    for group in saved["param_groups"][1:]:
        group.pop("mofasgd_side_clip_coef")
    saved["mofasgd_side_clip_coef"] = torch.tensor(coef, dtype=torch.float64)
    fresh = make(True)[1]
    fresh.load_state_dict(saved)
    assert fresh._side_clip_coef == coef < 1.0
