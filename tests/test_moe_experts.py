"""MoE experts: a 3-D stack of E expert matrices is trained by MoFaSGD exactly like E separate matrices.

transformers 5 fuses a layer's experts into 3-D parameters (``mlp.experts.gate_up_proj``, E x m x n) and runs
``F.linear(x, gate_up_proj[e])`` for each expert that gets a token, so an expert without a token gets an all-zero
gradient slice. These tests compare such a stack with E separate matrices given the same gradients (zeros for an
expert without a token), in every mode the optimizer has, and check routing, resume and data parallelism.
"""

import pytest
import torch
import torch.nn.functional as F
from ddp_helpers import run_on_ranks, window_backward
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from mofasgd import MoFaSGD, split_for_mofasgd
from mofasgd.data_parallel import ignore_managed_in_ddp

E, M, N, RANK = 4, 12, 10, 3
STEPS, ACCUM = 4, 2
# which experts get tokens in (step, micro-batch): expert 3 gets none in step 1, expert 0 none in step 2's first one
HIT = {(1, 0): (0, 1, 2), (1, 1): (0, 1, 2), (2, 0): (1, 2, 3)}


def _weights(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(E, M, N, generator=torch.Generator().manual_seed(0)).to(dtype)


def _expert_loss(matrices, step: int, micro: int) -> torch.Tensor:
    """A loss through each hit expert's matrix; the others get an exact zero gradient (as a fused stack's slices)."""
    gen = torch.Generator().manual_seed(10 * step + micro)
    x = torch.randn(6, N, generator=gen).to(matrices[0].dtype)
    target = torch.randn(6, M, generator=gen).to(matrices[0].dtype)
    loss = 0
    for e in range(E):
        if e in HIT.get((step, micro), range(E)):
            loss = loss + (F.linear(x, matrices[e]) - target).square().mean()
        else:
            loss = loss + (matrices[e] * 0).sum()
    return loss


def _train(optimizer, matrices_of, steps=range(STEPS), clip=0.5, stop_after_micro=None):
    """Steps with ACCUM micro-batches and clipping; `matrices_of()` gives the E matrices (slices of a stack)."""
    norms = []
    for step in steps:
        for micro in range(ACCUM):
            _expert_loss(matrices_of(), step, micro).backward()
            if stop_after_micro == (step, micro):
                return norms
        norms.append(float(optimizer.clip_grad_norm_(clip)))
        optimizer.step()
        optimizer.zero_grad()
    return norms


def _pair(dtype=torch.float32, **options):
    weights = _weights(dtype)
    stack = nn.Parameter(weights.clone())
    separate = [nn.Parameter(weights[e].clone()) for e in range(E)]
    settings = {"lr": 0.05, "rank": RANK, **options}
    return stack, MoFaSGD([stack], **settings), separate, MoFaSGD(separate, **settings)


OPTIONS = {
    "fused": {},
    "fused, nesterov, weight decay, 1/S off": dict(nesterov=True, weight_decay=0.1, use_ones_for_nonzero_s=True),
    "not fused": dict(fused=False),
    "randomized init": dict(init="weight_randomized"),
    "gradient init": dict(init="gradient"),
    "beta warm-up": dict(beta_start=0.5, beta_end=0.9, beta_warmup_steps=3),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_stack_of_experts_steps_exactly_like_separate_matrices(options):
    stack, stack_opt, separate, separate_opt = _pair(**options)
    stack_norms = _train(stack_opt, lambda: stack.unbind(0))
    separate_norms = _train(separate_opt, lambda: separate)
    assert stack_norms == pytest.approx(separate_norms, rel=1e-6)
    assert max(stack_norms) > 0.5  # clipping took part
    state = stack_opt.state[stack]
    assert {key: tuple(state[key].shape) for key in ("U", "S", "V", "step")} == {
        "U": (E, M, RANK),
        "S": (E, RANK),
        "V": (E, N, RANK),
        "step": (),
    }
    for e in range(E):
        assert not torch.equal(stack[e], _weights()[e])  # every expert moved, the idle ones included
        torch.testing.assert_close(stack[e], separate[e], atol=1e-6, rtol=1e-6)
        for key in ("U", "S", "V"):
            torch.testing.assert_close(state[key][e], separate_opt.state[separate[e]][key], atol=1e-5, rtol=1e-5)
    assert float(state["step"]) == STEPS


def test_a_stack_without_gradient_in_a_shared_bucket_is_left_alone():
    """Two layers' stacks share a bucket; in steps where only one gets a gradient, only that one steps (exactly)."""
    first, second = nn.Parameter(_weights().clone()), nn.Parameter(_weights().flip(0).clone())
    alone = nn.Parameter(_weights().clone())
    shared, single = MoFaSGD([first, second], lr=0.05, rank=RANK), MoFaSGD([alone], lr=0.05, rank=RANK)
    assert len(shared.intake.buckets[0]) == 1  # one bucket of 2 x E entries
    _train(shared, lambda: first.unbind(0), steps=range(1))
    _train(shared, lambda: second.unbind(0), steps=range(1))
    kept = second.detach().clone(), {key: shared.state[second][key].clone() for key in ("U", "S", "V")}
    _train(shared, lambda: first.unbind(0), steps=range(2, STEPS))
    _train(single, lambda: alone.unbind(0), steps=[0, *range(2, STEPS)])
    assert torch.equal(second, kept[0])
    assert all(torch.equal(shared.state[second][key], value) for key, value in kept[1].items())
    torch.testing.assert_close(first, alone, atol=1e-6, rtol=1e-6)
    for key in ("U", "S", "V"):
        torch.testing.assert_close(shared.state[first][key], single.state[alone][key], atol=1e-5, rtol=1e-5)


def test_an_idle_experts_momentum_decays_by_beta_and_its_weight_still_moves():
    stack = nn.Parameter(_weights())
    opt = MoFaSGD([stack], lr=0.05, rank=RANK, beta=0.8)
    x = torch.randn(6, N, generator=torch.Generator().manual_seed(1))
    spectra = []
    for _ in range(3):
        F.linear(x, stack[0]).square().sum().backward()  # only expert 0 gets tokens: the others' slices are zero
        before = stack.detach().clone()
        opt.step()
        opt.zero_grad()
        spectra.append(opt.state[stack]["S"].clone())
        assert all(not torch.equal(stack[e], before[e]) for e in range(E))
    torch.testing.assert_close(spectra[2][1:], 0.8**2 * spectra[0][1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(spectra[2][0], 0.8**2 * spectra[0][0])


def test_stack_of_bf16_experts_rounds_stochastically_like_separate_matrices():
    stack, stack_opt, separate, separate_opt = _pair(torch.bfloat16, lr=1e-4)
    assert stack_opt.param_groups[0]["stochastic_rounding"] is None  # on for bf16 weights
    _train(stack_opt, lambda: stack.unbind(0))
    _train(separate_opt, lambda: separate)
    assert stack_opt.state[stack]["U"].dtype == torch.float32
    moved = 0
    for e in range(E):
        assert torch.equal(stack[e], separate[e])  # same fp32 updates, same random bits in the same order
        moved += int((stack[e] != _weights(torch.bfloat16)[e]).sum())
    assert moved > 0  # updates far below half an ulp survive (round to nearest would drop them all)


def test_stack_of_experts_resumes_exactly_mid_accumulation(tmp_path):
    stack, stack_opt, _, _ = _pair()
    _train(stack_opt, lambda: stack.unbind(0))
    reference = stack.detach().clone()

    resumed = nn.Parameter(_weights().clone())
    first = MoFaSGD([resumed], lr=0.05, rank=RANK)
    _train(first, lambda: resumed.unbind(0), stop_after_micro=(2, 0))
    assert tuple(first.state[resumed]["GV"].shape) == (E, M, RANK)  # the pending sums are saved
    torch.save({"weights": resumed.detach(), "optimizer": first.state_dict()}, tmp_path / "ckpt.pt")
    del first
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    again = nn.Parameter(saved["weights"].clone())
    second = MoFaSGD([again], lr=0.05, rank=RANK)
    second.load_state_dict(saved["optimizer"])
    _expert_loss(again.unbind(0), 2, 1).backward()  # the rest of step 2's accumulation window
    second.clip_grad_norm_(0.5)
    second.step()
    second.zero_grad()
    _train(second, lambda: again.unbind(0), steps=range(3, STEPS))
    assert torch.equal(again, reference)


def test_expert_factors_of_the_wrong_shape_are_refused():
    stack, opt, _, _ = _pair()
    _train(opt, lambda: stack.unbind(0), steps=range(1))
    state = opt.state_dict()
    state["state"][0]["U"] = state["state"][0]["U"][:2]
    with pytest.raises(ValueError, match=r"U has shape \(2, 12, 3\), expected \(4, 12, 3\)"):
        MoFaSGD([nn.Parameter(_weights())], lr=0.05, rank=RANK).load_state_dict(state)


def test_stacks_that_cannot_be_stepped_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="eta2=0.5 needs each matrix's whole gradient.*stack of expert matrices"):
        MoFaSGD([nn.Parameter(_weights())], fused=False, eta2=0.5)
    with pytest.raises(ValueError, match="2-D matrices and 3-D stacks of expert matrices only"):
        MoFaSGD([nn.Parameter(torch.zeros(2, 3, 4, 5))])


class TinyMoE(nn.Module):
    """One MoE layer in transformers 5's layout: a router `gate` beside `experts` holding E x m x n stacks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate = nn.Linear(N, E, bias=False)
        self.experts = nn.Module()
        self.experts.up = nn.Parameter(torch.randn(E, M, N) / N**0.5)
        self.experts.down = nn.Parameter(torch.randn(E, N, M) / M**0.5)
        self.norm = nn.LayerNorm(N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.gate(x).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(x)
        for e in range(E):
            rows, slot = torch.where(chosen == e)
            if rows.numel():
                hidden = F.linear(F.silu(F.linear(x[rows], self.experts.up[e])), self.experts.down[e])
                out = out.index_add(0, rows, hidden * weights[rows, slot, None])
        return self.norm(x + out)


def test_router_stays_on_adamw_and_the_table_says_where_experts_went():
    routing = split_for_mofasgd(TinyMoE())
    assert [name for name, _ in routing.mofasgd] == ["experts.up", "experts.down"]
    assert "gate.weight" in [name for name, _ in routing.adamw]
    table = routing.table()
    assert "experts.up    4x12x10  1      MoFaSGD (4 experts, each a matrix)" in table
    assert "gate.weight   4x10     1      AdamW (router)" in table
    assert "MoFaSGD: 8 matrices (of them 8 experts in 2 tensors), 960 params" in table
    assert [n for n, _ in split_for_mofasgd(TinyMoE(), "experts,gate").mofasgd] == [
        "gate.weight",
        "experts.up",
        "experts.down",
    ]


def test_a_bare_experts_module_routes_its_stacks_to_mofasgd():
    bare = MixtralExperts(MixtralConfig(hidden_size=8, intermediate_size=6, num_local_experts=2))
    assert [name for name, _ in split_for_mofasgd(bare).mofasgd] == ["gate_up_proj", "down_proj"]
    assert [name for name, _ in split_for_mofasgd(nn.Linear(3, 4), "weight").mofasgd] == ["weight"]


def _moe_optimizer(model, data_parallel):
    routing = split_for_mofasgd(model)
    groups = [
        {"params": [p for _, p in routing.mofasgd]},
        {"params": [p for _, p in routing.adamw], "mofasgd": False, "lr": 1e-2},
    ]
    return MoFaSGD(groups, lr=0.05, rank=2, data_parallel=data_parallel), routing


def _moe_train(model, opt, rank=0, world=1, ddp=None):
    for step in range(3):
        for micro in range(ACCUM):
            gen = torch.Generator().manual_seed(100 * step + micro)
            x, y = torch.randn(8, N, generator=gen), torch.randn(8, N, generator=gen)
            shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
            net = ddp if ddp is not None else model
            loss = F.mse_loss(net(x[shard]), y[shard]) / ACCUM
            if ddp is not None:
                window_backward(ddp, loss, last=micro == ACCUM - 1)
            else:
                loss.backward()
        opt.step()
        opt.zero_grad()


def _ddp_run(rank, world):
    model = TinyMoE()
    opt, routing = _moe_optimizer(model, data_parallel=True)
    ignore_managed_in_ddp(model, [p for _, p in routing.mofasgd])
    ddp = DistributedDataParallel(model)
    _moe_train(model, opt, rank, world, ddp)
    return model.state_dict()


@pytest.mark.distributed
def test_two_process_ddp_averages_the_experts_like_one_process():
    result = run_on_ranks(_ddp_run)
    model = TinyMoE()
    opt, routing = _moe_optimizer(model, data_parallel=False)
    assert [name for name, _ in routing.mofasgd] == ["experts.up", "experts.down"]  # averaged by the optimizer
    _moe_train(model, opt)
    for key in ("experts.up", "experts.down", "gate.weight"):
        assert not torch.equal(result[key], TinyMoE().state_dict()[key])
        torch.testing.assert_close(result[key], model.state_dict()[key], atol=1e-5, rtol=1e-5)
