"""Resume, accumulation, AdamW side, norms, robustness and validation of the MoFaSGD optimizer."""

import io

import pytest
import torch
from torch import nn

from mofasgd import MoFaSGD, split_for_mofasgd


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.hidden = nn.Linear(8, 16)
        self.out_proj = nn.Linear(16, 8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11, bias=False)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        return self.head(self.norm(self.out_proj(torch.relu(self.hidden(self.embed(ids))))))


def make_optimizer(model, fused=True, **kw):
    routing = split_for_mofasgd(model)
    groups = [
        {"params": [p for _, p in routing.mofasgd]},
        {"params": [p for _, p in routing.adamw], "mofasgd": False, "lr": 3e-3},
    ]
    return MoFaSGD(groups, lr=2e-2, rank=3, fused=fused, nesterov=True, weight_decay=0.01, **kw)


def batch(seed, n=6):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, 5), generator=gen)
    return ids, torch.roll(ids, 1, dims=1)


def loss_of(model, ids, targets):
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())


def train(model, opt, steps, start=0, accum=1):
    losses = []
    for step in range(start, start + steps):
        for micro in range(accum):
            ids, targets = batch(step * 10 + micro)
            loss = loss_of(model, ids, targets) / accum
            loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses


def test_routing_sends_embeddings_head_norms_and_biases_to_adamw():
    routing = split_for_mofasgd(TinyNet())
    assert [n for n, _ in routing.mofasgd] == ["hidden.weight", "out_proj.weight"]
    assert {n for n, _ in routing.adamw} == {"embed.weight", "hidden.bias", "norm.weight", "norm.bias", "head.weight"}
    assert "MoFaSGD: 2 matrices" in routing.table()


def test_routing_counts_tied_weights_once_and_respects_target():
    model = TinyNet()
    model.head = nn.Linear(8, 11, bias=False)
    model.head.weight = model.embed.weight
    routing = split_for_mofasgd(model, target="out_proj")
    names = [n for n, _ in routing.mofasgd] + [n for n, _ in routing.adamw]
    assert len(names) == len({id(p) for p in model.parameters()})
    assert [n for n, _ in routing.mofasgd] == ["out_proj.weight"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "nonfused"])
def test_resume_from_state_dict_is_bit_exact(fused):
    torch.manual_seed(0)
    model = TinyNet()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, fused)
    train(model, opt, 8)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(0)
    first = TinyNet()
    first.load_state_dict(initial)
    opt1 = make_optimizer(first, fused)
    train(first, opt1, 5)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = TinyNet()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = make_optimizer(resumed, fused)
    opt2.load_state_dict(checkpoint["optim"])
    train(resumed, opt2, 3, start=5)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "nonfused"])
def test_accumulating_k_backward_passes_equals_one_step_on_the_summed_gradient(fused):
    torch.manual_seed(0)
    w1 = nn.Parameter(torch.randn(17, 9, dtype=torch.float64))
    w2 = nn.Parameter(w1.detach().clone())
    opt1 = MoFaSGD([w1], lr=0.1, rank=3, fused=fused)
    opt2 = MoFaSGD([w2], lr=0.1, rank=3, fused=fused)
    for _ in range(4):
        grads = [torch.randn(17, 9, dtype=torch.float64) for _ in range(3)]
        for g in grads:
            (w1 * g).sum().backward()
        (w2 * sum(grads)).sum().backward()
        opt1.step()
        opt2.step()
        opt1.zero_grad()
        opt2.zero_grad()
    torch.testing.assert_close(w1, w2, atol=1e-12, rtol=1e-12)


def test_fused_mode_frees_every_managed_gradient_after_backward():
    model = TinyNet()
    opt = make_optimizer(model, fused=True)
    ids, targets = batch(0)
    loss_of(model, ids, targets).backward()
    assert model.hidden.weight.grad is None and model.out_proj.weight.grad is None
    assert model.embed.weight.grad is not None and model.hidden.bias.grad is not None
    assert opt.state[model.hidden.weight]["GV"].shape == (16, 3)


def test_adamw_groups_equal_torch_adamw():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5))
    b = nn.Parameter(a.detach().clone())
    ours = MoFaSGD([{"params": [a], "mofasgd": False}], lr=1e-2, weight_decay=0.1, adam_betas=(0.8, 0.99))
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99))
    for _ in range(5):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_grad_norm_covers_managed_matrices_and_equals_dense_tangent_norm():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(12, 7, dtype=torch.float64))
    bias = nn.Parameter(torch.randn(7, dtype=torch.float64))
    opt = MoFaSGD([{"params": [w]}, {"params": [bias], "mofasgd": False}], lr=0.1, rank=2)
    g, gb = torch.randn(12, 7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    ((w * g).sum() + (bias * gb).sum()).backward()
    s = opt.state[w]
    pu, pv = s["U"] @ s["U"].T, s["V"] @ s["V"].T
    g_hat = pu @ g + g @ pv - pu @ g @ pv
    expected = (g_hat.square().sum() + gb.square().sum()).sqrt()
    torch.testing.assert_close(opt.grad_norm(), expected)


def test_clip_grad_norm_scales_the_consumed_gradient_exactly():
    torch.manual_seed(0)
    init = torch.randn(12, 7, dtype=torch.float64)
    g = 100 * torch.randn(12, 7, dtype=torch.float64)
    w1, w2 = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    opt1, opt2 = MoFaSGD([w1], lr=0.1, rank=2), MoFaSGD([w2], lr=0.1, rank=2)
    (w1 * g).sum().backward()
    norm = opt1.clip_grad_norm_(1.0)
    opt1.step()
    (w2 * (g / float(norm))).sum().backward()
    torch.testing.assert_close(opt2.grad_norm(), torch.tensor(1.0, dtype=torch.float64))
    opt2.step()
    torch.testing.assert_close(w1, w2)


def test_bf16_parameters_keep_fp32_orthonormal_factors_over_1000_steps():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 32).to(torch.bfloat16))
    opt = MoFaSGD([w], lr=1e-3, rank=8, use_ones_for_nonzero_s=True)
    for _ in range(1000):
        (w * torch.randn(64, 32).to(torch.bfloat16)).sum().backward()
        opt.step()
    s = opt.state[w]
    assert s["U"].dtype == s["S"].dtype == s["V"].dtype == torch.float32
    assert w.dtype == torch.bfloat16
    eye = torch.eye(8)
    assert (s["U"].T @ s["U"] - eye).abs().max() < 1e-4
    assert (s["V"].T @ s["V"] - eye).abs().max() < 1e-4
    assert torch.isfinite(w).all() and torch.isfinite(s["S"]).all()


@pytest.mark.parametrize(
    "shape,rank,grad_fn",
    [
        ((8, 6), 3, lambda m, n: torch.zeros(m, n)),
        ((8, 6), 4, lambda m, n: torch.randn(m, 1) @ torch.randn(1, n)),
        ((5, 3), 10, lambda m, n: torch.randn(m, n)),
        ((1, 9), 4, lambda m, n: torch.randn(m, n)),
        ((9, 1), 2, lambda m, n: torch.randn(m, n)),
    ],
    ids=["zero_grad", "grad_rank_below_r", "rank_above_min_dim", "row_vector", "column_vector"],
)
@pytest.mark.parametrize("init", ["weight", "gradient"])
@pytest.mark.parametrize("use_ones", [False, True], ids=["reciprocal", "ones"])
def test_degenerate_inputs_produce_no_nan_or_inf(shape, rank, grad_fn, init, use_ones):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(*shape))
    opt = MoFaSGD([w], lr=1e-2, rank=rank, init=init, nesterov=True, use_ones_for_nonzero_s=use_ones)
    for _ in range(5):
        (w * grad_fn(*shape)).sum().backward()
        opt.step()
    s = opt.state[w]
    assert s["U"].shape == (shape[0], min(rank, *shape))
    for t in (w, s["U"], s["S"], s["V"]):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"rank": 0}, "rank"),
        ({"rank": -2}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"lr": -1.0}, "lr"),
        ({"eps": -1e-4}, "eps"),
        ({"max_value": -1.0}, "max_value"),
        ({"eta1": -1.0}, "eta1"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"init": "svd"}, "init"),
        ({"beta_warmup_steps": 10}, "beta_start"),
        ({"beta_warmup_steps": 10, "beta_start": 0.5, "beta_end": 1.5}, "beta_end"),
        ({"eta2": 0.5}, "eta2"),
        ({"adam_betas": (0.9, 1.0)}, "adam_betas"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MoFaSGD([nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_misspelt_group_key_and_non_matrix_param_are_refused():
    with pytest.raises(ValueError, match="rnak"):
        MoFaSGD([{"params": [nn.Parameter(torch.randn(4, 4))], "rnak": 4}])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        MoFaSGD([nn.Parameter(torch.randn(4))])
    with pytest.raises(ValueError, match="rank"):
        MoFaSGD([{"params": [nn.Parameter(torch.randn(4, 4))], "rank": 0}])


def test_state_is_tensors_only_and_fp32():
    w = nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16))
    opt = MoFaSGD([w], rank=2)
    (w.float() * torch.randn(6, 4)).sum().backward()
    opt.step()
    state = opt.state_dict()["state"][0]
    assert set(state) == {"U", "S", "V", "step"}
    assert all(torch.is_tensor(v) and v.dtype == torch.float32 for v in state.values())


def test_hooks_use_the_param_groups_loaded_from_a_state_dict():
    source = MoFaSGD([nn.Parameter(torch.randn(8, 6))], rank=2, init="weight")
    saved = source.state_dict()
    w = nn.Parameter(torch.randn(8, 6))
    opt = MoFaSGD([w], rank=2, init="weight")
    opt.load_state_dict(saved)  # torch's load puts new group dicts in place
    opt.param_groups[0]["init"] = "gradient"
    g = torch.randn(8, 1) @ torch.randn(1, 6)
    (w * g).sum().backward()
    # the loaded group's gradient init makes U span the rank-1 gradient's column space, not W's
    u = opt.state[w]["U"][:, :1]
    direction = g[:, :1] / g[:, :1].norm()
    assert float((u.T @ direction).abs()) == pytest.approx(1.0, abs=1e-5)


def test_embeddings_and_head_join_mofasgd_only_when_named_explicitly():
    model = TinyNet()
    assert [n for n, _ in split_for_mofasgd(model, "all,head").mofasgd] == [
        "hidden.weight",
        "out_proj.weight",
        "head.weight",
    ]
    assert "embed.weight" in [n for n, _ in split_for_mofasgd(model, "all,embed,head").mofasgd]
    for target in ("all", ".*", "ea", ["hidden", "out_proj"]):
        names = [n for n, _ in split_for_mofasgd(model, target).mofasgd]
        assert "head.weight" not in names and "embed.weight" not in names, target


@pytest.mark.parametrize("head_name", ["v_head", "score"])
def test_a_score_head_stays_on_adamw_unless_named(head_name):
    """A reward model's value head (TRL / LLaMA-Factory `v_head.summary`) or a classifier's `score`: hidden -> 1."""
    model = TinyNet()
    head = nn.Sequential(nn.Linear(8, 1)) if head_name == "v_head" else nn.Linear(8, 1)
    setattr(model, head_name, head)
    heads = {n for n, _ in model.named_parameters() if n.startswith(head_name)}
    routing = split_for_mofasgd(model)
    assert [n for n, _ in routing.mofasgd] == ["hidden.weight", "out_proj.weight"]
    assert heads <= {n for n, _ in routing.adamw}
    named = {n for n, _ in split_for_mofasgd(model, f"all,{head_name}").mofasgd}
    assert named == {"hidden.weight", "out_proj.weight", f"{head_name}{'.0' if head_name == 'v_head' else ''}.weight"}


def test_mofasgd_on_embeddings_and_head_trains_and_frees_their_gradients():
    torch.manual_seed(0)
    model = TinyNet()
    routing = split_for_mofasgd(model, "all,embed,head")
    opt = MoFaSGD(
        [{"params": [p for _, p in routing.mofasgd]}, {"params": [p for _, p in routing.adamw], "mofasgd": False}],
        lr=1e-2,
        rank=3,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train(model, opt, 30)
    assert losses[-1] < losses[0]
    loss_of(model, *batch(99)).backward()
    assert model.embed.weight.grad is None and model.head.weight.grad is None  # consumed by the hooks
    assert "GV" in opt.state[model.embed.weight] and "GV" in opt.state[model.head.weight]
    assert not torch.equal(model.embed.weight, before["embed.weight"])
    assert not torch.equal(model.head.weight, before["head.weight"])
