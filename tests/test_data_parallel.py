"""Two gloo processes with DDP give the same parameters and factors as one process on the whole batch."""

import pytest
import torch
from ddp_helpers import run_on_ranks, window_backward
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mofasgd import MoFaSGD, split_for_mofasgd
from mofasgd.data_parallel import ignore_managed_in_ddp

pytestmark = pytest.mark.distributed
STEPS, ACCUM, BATCH = 4, 2, 8


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5))


def make_optimizer(model, data_parallel, init="weight"):
    routing = split_for_mofasgd(model)
    groups = [
        {"params": [p for _, p in routing.mofasgd]},
        {"params": [p for _, p in routing.adamw], "mofasgd": False, "lr": 1e-2},
    ]
    return MoFaSGD(groups, lr=0.05, rank=2, nesterov=True, data_parallel=data_parallel, init=init), routing


def data(step, micro):
    gen = torch.Generator().manual_seed(100 * step + micro)
    return torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 5, generator=gen)


def train(model, opt, rank=0, world=1, ddp=None):
    for step in range(STEPS):
        for micro in range(ACCUM):
            x, y = data(step, micro)
            shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            net = ddp if ddp is not None else model
            loss = nn.functional.mse_loss(net(x[shard]), y[shard]) / ACCUM
            if ddp is not None:
                window_backward(ddp, loss, last=micro == ACCUM - 1)
            else:
                loss.backward()
        opt.step()
        opt.zero_grad()


def ddp_run(rank, world, init="weight"):
    model = build()
    opt, routing = make_optimizer(model, data_parallel=True, init=init)
    ignore_managed_in_ddp(model, [p for _, p in routing.mofasgd])
    ddp = DistributedDataParallel(model)
    train(model, opt, rank, world, ddp)
    return {"model": model.state_dict(), "optim": opt.state_dict()}


# init="gradient" (issue 22, item 10): the ranks factor their mean first gradient from averaged thin sketches
@pytest.mark.parametrize("init", ["weight", "gradient"])
def test_two_process_ddp_equals_single_process(init):
    result = run_on_ranks(ddp_run, init)
    model = build()
    opt, _ = make_optimizer(model, data_parallel=False, init=init)
    train(model, opt)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(result["model"][key], value, atol=1e-5, rtol=1e-5)
    single = opt.state_dict()["state"]
    for index, state in result["optim"]["state"].items():
        if "U" in state:
            m_dist = state["U"] @ torch.diag(state["S"]) @ state["V"].T
            m_single = single[index]["U"] @ torch.diag(single[index]["S"]) @ single[index]["V"].T
            torch.testing.assert_close(m_dist, m_single, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(state["exp_avg"], single[index]["exp_avg"], atol=1e-6, rtol=1e-5)


def test_without_averaging_each_rank_would_diverge(tmp_path):
    """Guard that the test above can fail: the local projections of half a batch differ from the global ones."""
    model_a, model_b = build(), build()
    opt_a, _ = make_optimizer(model_a, data_parallel=False)
    opt_b, _ = make_optimizer(model_b, data_parallel=False)
    train(model_a, opt_a)
    train(model_b, opt_b, rank=0, world=2)
    assert not torch.allclose(model_a[0].weight, model_b[0].weight, atol=1e-4)


def test_data_parallel_refuses_nonfused():
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="fused=False"):
        MoFaSGD([w], fused=False, data_parallel=True)
