import copy
import io
import warnings

import pytest
import torch
from galore_fused import FusedGaLoreAdamW
from galore_torch import GaLoreAdamW
from torch import nn

GAP = 3  # projector refresh before steps 0, 3, 6, ...
HPARAMS = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.05}


class TinyNet(nn.Module):
    """A tall (24 x 16) and a wide (10 x 24) matrix, biases and a norm: both sides of GaLore's projection."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.up = nn.Linear(16, 24, dtype=dtype)
        self.norm = nn.LayerNorm(24, dtype=dtype)
        self.down = nn.Linear(24, 10, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.norm(self.up(x))))


def make_model(dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(dtype)


def param_groups(model: TinyNet, proj_type: str = "std") -> list[dict]:
    galore = [model.up.weight, model.down.weight]
    others = [p for p in model.parameters() if all(p is not g for g in galore)]
    return [
        {"params": others, "weight_decay": 0.0},
        {"params": galore, "rank": 4, "update_proj_gap": GAP, "scale": 0.5, "proj_type": proj_type},
    ]


def reference_optimizer(model: TinyNet, proj_type: str = "std") -> GaLoreAdamW:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return GaLoreAdamW(param_groups(model, proj_type), **HPARAMS)


def batches(step: int, micro: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [
        (torch.randn(5, 16, generator=gen).to(dtype), torch.randn(5, 10, generator=gen).to(dtype))
        for _ in range(micro)
    ]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, micro: int = 1) -> None:
    dtype = next(model.parameters()).dtype
    for x, y in batches(step, micro, dtype):
        (nn.functional.mse_loss(model(x), y) / micro).backward()
    optimizer.step()
    optimizer.zero_grad()


def assert_same_params(a: nn.Module, b: nn.Module, **tol) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=lambda m, name=name: f"{name}: {m}", **tol)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_fused_steps_equal_galore_adamw_across_projector_refreshes(proj_type):
    """Equal up to float rounding: the fused optimizer keeps a compact copy of galore-torch's projector slice,
    and BLAS may round differently for the copy than for the strided slice."""
    fused_model, ref_model = make_model(), make_model()
    fused = FusedGaLoreAdamW(param_groups(fused_model, proj_type), **HPARAMS)
    ref = reference_optimizer(ref_model, proj_type)
    for step in range(2 * GAP + 2):
        train_step(fused_model, fused, step)
        train_step(ref_model, ref, step)
        assert_same_params(fused_model, ref_model, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_model.up.weight, make_model().up.weight)


def test_bf16_steps_equal_galore_adamw():
    fused_model, ref_model = make_model(torch.bfloat16), make_model(torch.bfloat16)
    fused = FusedGaLoreAdamW(param_groups(fused_model), **HPARAMS)
    ref = reference_optimizer(ref_model)
    for step in range(GAP + 2):
        train_step(fused_model, fused, step)
        train_step(ref_model, ref, step)
    assert_same_params(fused_model, ref_model, rtol=0, atol=0)
    assert fused.state[fused_model.up.weight]["exp_avg"].dtype == torch.bfloat16


def test_accumulation_over_micro_batches_is_exact():
    fused_model, ref_model = make_model(torch.float64), make_model(torch.float64)
    fused = FusedGaLoreAdamW(param_groups(fused_model), **HPARAMS)
    ref = reference_optimizer(ref_model)
    for step in range(2 * GAP + 1):
        train_step(fused_model, fused, step, micro=3)
        train_step(ref_model, ref, step, micro=3)
    assert_same_params(fused_model, ref_model, rtol=1e-12, atol=1e-12)


def test_accumulated_update_differs_from_last_micro_batch_alone():
    """Guards the previous test: dropping all but one micro-batch must be visible."""
    accumulated, last_only = make_model(torch.float64), make_model(torch.float64)
    opt_a = FusedGaLoreAdamW(param_groups(accumulated), **HPARAMS)
    opt_b = FusedGaLoreAdamW(param_groups(last_only), **HPARAMS)
    for step in range(GAP + 1):
        train_step(accumulated, opt_a, step, micro=3)
        x, y = batches(step, 3, torch.float64)[-1]
        (nn.functional.mse_loss(last_only(x), y) / 3).backward()
        opt_b.step()
        opt_b.zero_grad()
    assert not torch.allclose(accumulated.up.weight, last_only.up.weight)


def test_backward_frees_galore_gradients_except_before_a_projector_refresh():
    model = make_model()
    optimizer = FusedGaLoreAdamW(param_groups(model), **HPARAMS)
    managed = [model.up.weight, model.down.weight]
    for step in range(GAP + 2):
        for x, y in batches(step, 2):
            nn.functional.mse_loss(model(x), y).backward()
            refresh = step % GAP == 0
            assert all((p.grad is not None) == refresh for p in managed), f"step {step}"
            assert model.up.bias.grad is not None and model.norm.weight.grad is not None
        optimizer.step()
        assert all(p.grad is None for p in managed)
        optimizer.zero_grad()


def test_pending_low_rank_gradient_has_projected_shape_in_fp32():
    model = make_model(torch.bfloat16)
    optimizer = FusedGaLoreAdamW(param_groups(model), **HPARAMS)
    train_step(model, optimizer, 0)
    x, y = batches(1, 1, torch.bfloat16)[0]
    nn.functional.mse_loss(model(x), y).backward()
    assert optimizer._pending[model.up.weight].shape == (24, 4)  # tall: G P^T
    assert optimizer._pending[model.down.weight].shape == (4, 24)  # wide: P^T G
    assert all(t.dtype == torch.float32 for t in optimizer._pending.values())
    optimizer.zero_grad()
    assert not optimizer._pending


def test_resume_from_state_dict_continues_identically():
    model = make_model()
    optimizer = FusedGaLoreAdamW(param_groups(model), **HPARAMS)
    for step in range(GAP + 1):
        train_step(model, optimizer, step)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model = copy.deepcopy(model)
    resumed = FusedGaLoreAdamW(param_groups(resumed_model), **HPARAMS)
    resumed.load_state_dict(saved)
    for step in range(GAP + 1, 3 * GAP + 1):
        train_step(model, optimizer, step)
        train_step(resumed_model, resumed, step)
    assert_same_params(model, resumed_model, rtol=0, atol=0)


def test_state_dict_holds_tensors_only():
    model = make_model()
    optimizer = FusedGaLoreAdamW(param_groups(model, "full"), **HPARAMS)
    train_step(model, optimizer, 0)
    for state in optimizer.state_dict()["state"].values():
        assert state and all(torch.is_tensor(v) for v in state.values())
    assert {"ortho_left", "ortho_right", "exp_avg", "exp_avg_sq", "step"} == set(optimizer.state[model.up.weight])


def test_grad_norm_is_norm_of_consumed_gradient_and_clipping_scales_it():
    model = make_model(torch.float64)
    optimizer = FusedGaLoreAdamW(param_groups(model), **HPARAMS)
    train_step(model, optimizer, 0)
    x, y = batches(1, 1, torch.float64)[0]
    params = list(model.parameters())
    full = dict(zip(params, torch.autograd.grad(nn.functional.mse_loss(model(x), y), params)))
    nn.functional.mse_loss(model(x), y).backward()
    up_proj = optimizer.state[model.up.weight]["ortho"]  # tall: right basis (r x n)
    down_proj = optimizer.state[model.down.weight]["ortho"]  # wide: left basis (m x r)
    consumed = [full[model.up.weight] @ up_proj.T, down_proj.T @ full[model.down.weight]]
    consumed += [g for p, g in full.items() if p is not model.up.weight and p is not model.down.weight]
    expected = torch.sqrt(sum(g.square().sum() for g in consumed))
    torch.testing.assert_close(optimizer.grad_norm(), expected)
    before = optimizer.clip_grad_norm_(0.5 * float(expected))
    torch.testing.assert_close(before, expected)
    torch.testing.assert_close(optimizer.grad_norm(), 0.5 * expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "group, message",
    [
        ({"rank": 4, "update_proj_gap": 2, "scale": 1.0}, "missing"),
        ({"rank": 0, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std"}, "rank"),
        ({"rank": 4, "update_proj_gap": 0, "scale": 1.0, "proj_type": "std"}, "update_proj_gap"),
        ({"rank": 4, "update_proj_gap": 2, "scale": 1.0, "proj_type": "diagonal"}, "proj_type"),
    ],
)
def test_invalid_galore_group_is_refused(group, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        FusedGaLoreAdamW([{"params": [model.up.weight], **group}])


def test_non_matrix_in_galore_group_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="2-D"):
        FusedGaLoreAdamW(
            [{"params": [model.up.bias], "rank": 4, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std"}]
        )


def test_dropped_optimizer_stops_consuming_gradients():
    model = make_model()
    optimizer = FusedGaLoreAdamW(param_groups(model), **HPARAMS)
    train_step(model, optimizer, 0)
    del optimizer
    x, y = batches(1, 1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    assert model.up.weight.grad is not None


def test_stored_projector_owns_only_its_own_storage():
    """galore-torch hands back a slice of the SVD factor; the state must not pin the whole factor."""
    from galore_fused import FusedGaLoreAdamW

    w = torch.nn.Parameter(torch.randn(64, 48))
    opt = FusedGaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 10, "scale": 1.0, "proj_type": "std"}])
    (w * torch.randn(64, 48)).sum().backward()
    opt.step()
    ortho = opt.state[w]["ortho"]
    assert ortho.untyped_storage().nbytes() == ortho.numel() * ortho.element_size()


def test_recreated_fused_galore_trains_after_the_old_one_is_deleted():
    import gc

    model = make_model()
    first = FusedGaLoreAdamW(param_groups(model), **HPARAMS)
    train_step(model, first, 0)
    first.zero_grad()
    del first
    gc.collect()
    second = FusedGaLoreAdamW(param_groups(model), **HPARAMS)
    before = model.up.weight.detach().clone()
    train_step(model, second, 0)
    assert (model.up.weight - before).abs().max() > 1e-4
    assert len(model.up.weight._post_accumulate_grad_hooks) == 1  # the dead optimizer's hook was removed
