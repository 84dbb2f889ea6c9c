import pytest
import torch

from scripts.nanogpt.muon import Muon, orthogonalize


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_orthogonalize_maps_singular_values_near_one_and_keeps_singular_vectors(shape):
    torch.manual_seed(0)
    k = min(shape)
    u, v = torch.linalg.qr(torch.randn(shape[0], k))[0], torch.linalg.qr(torch.randn(shape[1], k))[0]
    matrix = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # condition number 100
    result = orthogonalize(matrix)
    assert result.shape == matrix.shape and result.dtype == matrix.dtype
    core = u.T @ result @ v  # diagonal when the singular vectors are kept
    singular = torch.diagonal(core)
    assert singular.min() > 0.6 and singular.max() < 1.25
    torch.testing.assert_close(core, torch.diag(singular), atol=1e-4, rtol=0)
    assert torch.linalg.matrix_norm(result - u @ core @ v.T) < 1e-4  # nothing outside span(u) x span(v)


def test_first_muon_step_is_the_scaled_orthogonalised_gradient():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 16))
    start = weight.detach().clone()
    weight.grad = torch.randn(64, 16)
    Muon([weight], lr=0.1, momentum=0.9, nesterov=True).step()
    # Nesterov's first direction is (1 + momentum) G; orthogonalisation ignores the scale.
    expected = start - 0.1 * (64 / 16) ** 0.5 * orthogonalize(1.9 * weight.grad)
    torch.testing.assert_close(weight.detach(), expected)


def test_muon_momentum_accumulates_gradients():
    weight = torch.nn.Parameter(torch.zeros(8, 8))
    optimizer = Muon([weight], lr=0.0, momentum=0.5, nesterov=False)
    for grad in (torch.ones(8, 8), 2 * torch.ones(8, 8)):
        weight.grad = grad
        optimizer.step()
    torch.testing.assert_close(optimizer.state[weight]["momentum_buffer"], 2.5 * torch.ones(8, 8))


def test_muon_refuses_non_matrices_and_unknown_group_keys():
    with pytest.raises(ValueError, match="only handles matrices"):
        Muon([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="unknown keys \\['betas'\\]"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "betas": (0.9, 0.9)}])
    with pytest.raises(ValueError, match="momentum"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], momentum=1.0)
