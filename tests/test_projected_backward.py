"""The projected linear backward: nn.Linear weights trained from G V = dY^T (X V) and G^T U = X^T (dY U) alone.

Every test runs the same model twice, through the projected path (``opt.attach(model)``) and through the gradient
hook, and compares weights, factors, losses and logged norms; and checks that each managed matrix moved.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ddp_helpers import run_on_ranks, window_backward
from torch import nn
from torch.utils.checkpoint import checkpoint

from mofasgd import MoFaSGD
from mofasgd.projected_linear import HOOK, PROJECTED

VOCAB, HIDDEN, WIDE = 40, 24, 36


class TinyNet(nn.Module):
    """Embedding, two Linear layers (one with bias), a free matrix, an untied head; optional checkpointing."""

    def __init__(self, checkpointing: str | None = None, reuse: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.up = nn.Linear(HIDDEN, WIDE)
        self.down = nn.Linear(WIDE, HIDDEN, bias=False)
        self.mix = nn.Parameter(torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5)  # not a Linear: hook path
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.checkpointing = checkpointing
        self.reuse = reuse  # `up`'s weight is also used outside its Linear

    def block(self, h: torch.Tensor) -> torch.Tensor:
        inner = torch.relu(self.up(h))
        if self.reuse:
            inner = inner + 0.5 * F.linear(h, self.up.weight)
        return h + self.down(inner) @ self.mix

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        if self.checkpointing is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.checkpointing == "reentrant")
        return self.head(self.norm(h))


def managed(model: TinyNet) -> list[nn.Parameter]:
    return [model.up.weight, model.down.weight, model.mix]


def build(seed: int = 0, dtype: torch.dtype = torch.float32, **model_kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**model_kwargs).to(dtype)


def make_optimizer(model: TinyNet, projected: bool, **options) -> MoFaSGD:
    others = [p for n, p in model.named_parameters() if all(p is not q for q in managed(model))]
    options = {"lr": 2e-2, "rank": 4, "weight_decay": 0.01, **options}
    groups = [{"params": managed(model)}, {"params": others, "mofasgd": False, "lr": 1e-2}]
    opt = MoFaSGD(groups, **options)
    attachment = opt.attach(model)
    if projected:
        note = "first step forms dW once: init='gradient'" if options.get("init") == "gradient" else ""
        assert attachment.paths["up.weight"] == (PROJECTED, note)
        assert attachment.paths["down.weight"] == (PROJECTED, note)
        assert attachment.paths["mix"] == (HOOK, "not the weight of an nn.Linear")
    else:
        attachment.detach()
    return opt


def batches(steps: int, accumulation: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, VOCAB, (3, 7), generator=gen) for _ in range(accumulation)] for _ in range(steps)]


def train(
    projected: bool,
    steps: int = 20,
    accumulation: int = 2,
    dtype: torch.dtype = torch.float32,
    autocast: bool = False,
    model_kwargs: dict | None = None,
    clip: float = 1.0,
    **options,
):
    """Train; return (model, optimizer, losses, norms)."""
    model = build(dtype=dtype, **(model_kwargs or {}))
    opt = make_optimizer(model, projected, **options)
    losses, norms = [], []
    for micro_batches in batches(steps, accumulation):
        for tokens in micro_batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(tokens)
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens.reshape(-1)) / accumulation
            loss.backward()
            losses.append(loss.item())
        norms.append(opt.clip_grad_norm_(clip).item())
        opt.step()
        opt.zero_grad()
    return model, opt, losses, norms


def assert_same_run(a, b, atol: float, rtol: float) -> None:
    (model_a, opt_a, losses_a, norms_a), (model_b, opt_b, losses_b, norms_b) = a, b
    torch.testing.assert_close(torch.tensor(losses_a), torch.tensor(losses_b), atol=atol, rtol=rtol)
    torch.testing.assert_close(torch.tensor(norms_a), torch.tensor(norms_b), atol=atol, rtol=rtol)
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(p.float(), q.float(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    for p, q in zip(managed(model_a), managed(model_b)):  # singular vectors up to sign: compare the momentum
        ma = opt_a.state[p]["U"] * opt_a.state[p]["S"] @ opt_a.state[p]["V"].T
        mb = opt_b.state[q]["U"] * opt_b.state[q]["S"] @ opt_b.state[q]["V"].T
        torch.testing.assert_close(ma, mb, atol=atol, rtol=rtol)


def assert_every_matrix_moved(model: TinyNet, start: TinyNet, reference: TinyNet) -> None:
    """Each managed matrix moved, by (nearly) as much as in the reference run."""
    for p, p0, ref in zip(managed(model), managed(start), managed(reference)):
        moved, expected = (p - p0).float().norm(), (ref - p0).float().norm()
        assert moved > 0.5 * expected > 0, (moved, expected)


OPTIONS = {
    "default": {},
    "nesterov": {"nesterov": True},
    "ones": {"use_ones_for_nonzero_s": True},
    "current_projection": {"use_current_projection": True},
    "beta_warmup": {"beta_start": 0.5, "beta_end": 0.95, "beta_warmup_steps": 5},
    "weight_randomized": {"init": "weight_randomized"},
    "gradient_init": {"init": "gradient"},
    "factored_side": {"adamw_state": "factored"},
    "fused_side": {"fused_adamw_side": True},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_projected_path_equals_the_hook_path_over_20_steps(options):
    hooked = train(False, **options)
    projected = train(True, **options)
    assert_same_run(projected, hooked, atol=2e-5, rtol=2e-5)
    assert_every_matrix_moved(projected[0], build(), hooked[0])


def test_no_managed_linear_weight_ever_accumulates_a_gradient():
    """A counting post-accumulate-grad hook on each projected weight fires 0 times (and on the hook path, every
    micro-batch: the count can fail); `.grad` is never set."""
    counts = {}
    for projected in (False, True):
        model = build()
        opt = make_optimizer(model, projected)
        fired = {"up": 0, "down": 0}
        for name in fired:
            getattr(model, name).weight.register_post_accumulate_grad_hook(
                lambda p, n=name, seen=fired: seen.__setitem__(n, seen[n] + 1)
            )
        for micro_batches in batches(3, 2):
            for tokens in micro_batches:
                F.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1)).backward()
                assert model.up.weight.grad is None and model.down.weight.grad is None
            opt.step()
            opt.zero_grad()
        counts[projected] = fired
    assert counts[False] == {"up": 6, "down": 6}
    assert counts[True] == {"up": 0, "down": 0}


def test_projected_backward_forms_no_weight_sized_product():
    """The profiler sees no matrix product with an m x n (weight-shaped) output in the projected backward."""

    def weight_shaped_products(projected: bool) -> int:
        model = build()
        opt = make_optimizer(model, projected)
        first, second = batches(2, 1)
        F.cross_entropy(model(first[0]).reshape(-1, VOCAB), first[0].reshape(-1)).backward()  # factors made here
        opt.step()
        opt.zero_grad()
        tokens = second[0]
        loss = F.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1))
        with torch.profiler.profile(record_shapes=True) as prof:
            loss.backward()
        shapes = {(WIDE, HIDDEN), (HIDDEN, WIDE)}
        count = 0
        for event in prof.events():
            if event.name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm") and event.input_shapes:
                a, b = event.input_shapes[0], event.input_shapes[-1]
                if len(a) == 2 and len(b) == 2 and (a[0], b[1]) in shapes:
                    count += 1
        return count

    assert weight_shaped_products(False) >= 2  # dW of up and down
    assert weight_shaped_products(True) == 0


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_gradient_checkpointing_keeps_the_projected_path_exact(mode):
    kwargs = {"model_kwargs": {"checkpointing": mode}}
    hooked, projected = train(False, **kwargs), train(True, **kwargs)
    assert_same_run(projected, hooked, atol=2e-5, rtol=2e-5)
    assert_every_matrix_moved(projected[0], build(), hooked[0])


def test_a_weight_also_used_outside_its_linear_counts_both_uses():
    kwargs = {"model_kwargs": {"reuse": True}}
    hooked, projected = train(False, **kwargs), train(True, **kwargs)
    assert_same_run(projected, hooked, atol=2e-5, rtol=2e-5)
    # and the reused weight's outside use really reached the optimizer: without it the run differs
    without_reuse = train(True)
    assert (projected[0].up.weight - without_reuse[0].up.weight).abs().max() > 1e-3


def _sequence_logp(model: TinyNet, tokens: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(model(tokens)[:, :-1].float(), dim=-1)
    return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1).sum(-1)


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant"], ids=["plain", "checkpointing"])
def test_preference_losses_with_several_forwards_per_backward_match_the_hook_path(checkpointing):
    """DPO- and KTO-style micro-batches: the policy runs twice with grad (chosen, rejected) and once under no_grad
    (a reference / KL pass through the same modules) before one backward; each grad forward's projections add up
    to those of the summed gradient, and the no_grad pass adds nothing."""

    def run(projected: bool) -> tuple[TinyNet, list[float]]:
        model = build(checkpointing=checkpointing)
        opt = make_optimizer(model, projected)
        losses = []
        for step, micro_batches in enumerate(batches(8, 2)):
            for tokens in micro_batches:
                chosen, rejected = tokens[:, : tokens.shape[1] - step % 2], tokens.flip(1)
                with torch.no_grad():
                    reference = _sequence_logp(model, chosen) - _sequence_logp(model, rejected)
                margin = _sequence_logp(model, chosen) - _sequence_logp(model, rejected) - reference
                loss = -F.logsigmoid(0.1 * margin).mean() / len(micro_batches)
                loss.backward()
                losses.append(loss.item())
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
        return model, losses

    (hooked, hook_losses), (projected, projected_losses) = run(False), run(True)
    assert projected_losses == pytest.approx(hook_losses, rel=1e-5)
    for p, q in zip(projected.parameters(), hooked.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=2e-5)
    assert_every_matrix_moved(projected, build(), hooked)


def _penalised_backward(model: TinyNet, opt: MoFaSGD, tokens: torch.Tensor) -> None:
    """loss + ||dloss/dh||^2 through torch.autograd.grad(create_graph=True): the projected path adds nothing during
    autograd.grad (it accumulates into no leaf), and the second-order terms reach W as on the hook path."""
    h = model.embed(tokens)
    loss = F.cross_entropy(model.head(model.norm(model.block(h))).reshape(-1, VOCAB), tokens.reshape(-1))
    (grad_h,) = torch.autograd.grad(loss, h, create_graph=True)
    assert all("GV" not in opt.state[p] for p in managed(model))
    (loss + grad_h.square().sum()).backward()


def _create_graph_backward(model: TinyNet, opt: MoFaSGD, tokens: torch.Tensor) -> None:
    F.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1)).backward(create_graph=True)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("backward", [_penalised_backward, _create_graph_backward], ids=["penalty", "create_graph"])
def test_create_graph_matches_the_hook_path(backward):
    def run(projected: bool) -> TinyNet:
        model = build()
        opt = make_optimizer(model, projected)
        for micro_batches in batches(5, 1):
            backward(model, opt, micro_batches[0])
            opt.step()
            opt.zero_grad()
        return model

    hooked, projected = run(False), run(True)
    for p, q in zip(projected.parameters(), hooked.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=2e-5)
    assert_every_matrix_moved(projected, build(), hooked)


def test_one_backward_under_autocast_is_closer_to_the_exact_projections_than_the_hook():
    """Under bf16 autocast the projected path multiplies the bf16 X and dY in fp32; the hook path projects a
    bf16-rounded dW. Both against the float64 projections of the same bf16 X and dY."""
    model = build()
    opt = make_optimizer(model, True, lr=0.0)
    tokens = batches(1, 1)[0][0]
    saved = {}

    def keep(module, inputs, output):
        saved["x"] = inputs[0].detach()
        output.register_hook(lambda g: saved.__setitem__("dy", g.detach()))

    model.up.register_forward_hook(keep)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens.reshape(-1)).backward()
    state = opt.state[model.up.weight]
    x, dy = saved["x"].reshape(-1, HIDDEN).to(torch.bfloat16), saved["dy"].reshape(-1, WIDE)  # autocast's operands
    assert dy.dtype == torch.bfloat16
    exact_gv = (dy.double().T @ x.double()) @ state["V"].double()
    bf16_g = (dy.T @ x).double()  # the dW the hook path projects
    hook_error = (bf16_g @ state["V"].double() - exact_gv).norm() / exact_gv.norm()
    projected_error = (state["GV"].double() - exact_gv).norm() / exact_gv.norm()
    assert projected_error < 1e-5 < hook_error


@pytest.mark.parametrize(
    "dtype,autocast", [(torch.bfloat16, False), (torch.float32, True)], ids=["pure_bf16", "autocast"]
)
def test_bf16_paths_agree_with_the_hook_path_to_bf16_rounding(dtype, autocast):
    hooked = train(False, dtype=dtype, autocast=autocast, steps=10)
    projected = train(True, dtype=dtype, autocast=autocast, steps=10)
    start = build(dtype=dtype)
    for p, q, p0 in zip(managed(projected[0]), managed(hooked[0]), managed(start)):
        step_p, step_q = (p - p0).float(), (q - p0).float()
        assert (step_p - step_q).norm() < 0.1 * step_q.norm()  # the same updates, up to bf16 rounding
    assert_every_matrix_moved(projected[0], start, hooked[0])
    torch.testing.assert_close(torch.tensor(projected[2]), torch.tensor(hooked[2]), atol=2e-2, rtol=2e-2)


def test_projected_backward_false_and_unfused_keep_the_hook_path_and_say_why():
    model = build()
    others = [p for p in model.parameters() if all(p is not q for q in managed(model))]
    groups = [{"params": managed(model)}, {"params": others, "mofasgd": False}]
    off = MoFaSGD(groups, projected_backward=False).attach(model)
    assert off.paths["up.weight"] == (HOOK, "projected_backward=False")
    assert "forward" not in model.up.__dict__
    model = build()
    groups = [
        {"params": managed(model)},
        {
            "params": [
                p for p in model.parameters() if p.dim() != 2 or p is model.head.weight or p is model.embed.weight
            ],
            "mofasgd": False,
        },
    ]
    unfused = MoFaSGD(groups, fused=False, eta2=0.1).attach(model)
    assert unfused.paths["down.weight"] == (HOOK, "eta2 > 0 needs the dense gradient (fused=False)")
    assert "Projected backward: 0 of 3" in unfused.table()


def test_remove_hooks_restores_the_linear_forward_and_a_dead_optimizer_leaves_plain_linears():
    model = build()
    opt = make_optimizer(model, True)
    assert "forward" in model.up.__dict__
    opt.remove_hooks()
    assert "forward" not in model.up.__dict__
    model = build()
    opt = make_optimizer(model, True)
    del opt
    tokens = batches(1, 1)[0][0]
    F.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1)).backward()
    assert model.up.weight.grad is not None  # nobody consumes it: the plain Linear backward ran


def test_resume_is_exact_on_the_projected_path():
    """Save after 4 steps, resume into a fresh model and optimizer (projected again), end equal to the whole run."""
    data = batches(8, 2)

    def steps(model, opt, micro_batches_list):
        for micro_batches in micro_batches_list:
            for tokens in micro_batches:
                F.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1)).backward()
            opt.step()
            opt.zero_grad()

    full = build()
    opt = make_optimizer(full, True)
    steps(full, opt, data[:4])
    saved = ({k: v.clone() for k, v in full.state_dict().items()}, _clone(opt.state_dict()))
    steps(full, opt, data[4:])
    resumed = build(seed=5)
    resumed.load_state_dict(saved[0])
    opt2 = make_optimizer(resumed, True)
    opt2.load_state_dict(saved[1])
    steps(resumed, opt2, data[4:])
    for p, q in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert_every_matrix_moved(full, build(), full)


def _clone(obj):
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def _ddp_run(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    from mofasgd.data_parallel import ignore_managed_in_ddp

    model = build()
    opt = make_optimizer(model, True, data_parallel=True)
    ignore_managed_in_ddp(model, managed(model))
    ddp = DistributedDataParallel(model)
    for micro_batches in batches(6, 2, seed=3):
        for i, tokens in enumerate(micro_batches):
            mine = tokens[rank::world]
            loss = F.cross_entropy(ddp(mine).reshape(-1, VOCAB), mine.reshape(-1)) / 2
            window_backward(ddp, loss, last=i == len(micro_batches) - 1)
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    return model.state_dict()


@pytest.mark.distributed
def test_two_process_ddp_on_the_projected_path_equals_one_process():
    """Each rank projects its half batch; the averaged projections equal one process's over the whole batch."""
    result = run_on_ranks(_ddp_run)
    model = build()
    opt = make_optimizer(model, True)
    for micro_batches in batches(6, 2, seed=3):
        for tokens in micro_batches:
            # the mean over ranks of each rank's mean loss over its rows = the mean over the batch (equal halves)
            halves = [tokens[r::2] for r in range(2)]
            loss = sum(F.cross_entropy(model(h).reshape(-1, VOCAB), h.reshape(-1)) for h in halves) / 4
            loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(result[key], value, atol=2e-5, rtol=2e-5)
    assert_every_matrix_moved(model, build(), model)


def test_no_weight_sized_transient_in_the_backward_of_an_8b_proportioned_llama():
    """On the hook path each managed matrix's m x n gradient is allocated in backward; on the projected path no
    allocation is as large as any managed matrix, and the backward's transient peak is lower
    (benchmarks/projected_memory.py measures the same at other sizes)."""
    from benchmarks import projected_memory

    # 96 tokens: no activation has a managed matrix's size
    hook = projected_memory.backward_allocations(False, hidden=128, tokens=96, rank=8)
    projected = projected_memory.backward_allocations(True, hidden=128, tokens=96, rank=8)
    matrix_bytes = {m * n * 4 for m, n in [(128, 128), (32, 128), (448, 128), (128, 448)]}
    assert sum(size in matrix_bytes for size in hook.sizes) >= 14  # 7 matrices x 2 layers
    assert not [size for size in projected.sizes if size in matrix_bytes]
    assert projected.peak < hook.peak


def test_a_newer_optimizer_takes_the_linears_over_and_the_old_ones_removal_leaves_them_projected():
    """As with the gradient hooks, the newest optimizer owns the matrices (HF's auto_find_batch_size re-creates
    it): the projections reach it, and removing the old optimizer's hooks does not undo its attachment."""
    model = build()
    old = make_optimizer(model, True)
    with pytest.warns(UserWarning, match="takes it over"):
        new = make_optimizer(model, True)
    old.remove_hooks()
    assert "forward" in model.up.__dict__
    tokens = batches(1, 1)[0][0]
    F.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1)).backward()
    assert model.up.weight.grad is None
    assert "GV" in new.state[model.up.weight] and "GV" not in old.state.get(model.up.weight, {})
