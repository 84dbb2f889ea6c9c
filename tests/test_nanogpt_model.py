import torch

from scripts.nanogpt.config import ModelConfig
from scripts.nanogpt.model import GPT, parameter_roles


def tiny_model(**overrides):
    torch.manual_seed(0)
    return GPT(ModelConfig(**{"vocab_size": 64, "depth": 2, "width": 32, "heads": 2, **overrides}))


def test_logits_at_a_position_ignore_later_tokens():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert before.shape == (2, 16, 64)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_logits_depend_on_position_through_rotary_embeddings():
    # Attention without positions is permutation-equivariant; with rotary it must not be.
    model = tiny_model()
    idx = torch.tensor([[5, 9, 5, 9, 5, 9, 5, 9]])
    with torch.no_grad():
        logits = model(idx)
    assert not torch.allclose(logits[0, 2], logits[0, 4])


def test_initial_loss_is_near_uniform_and_soft_cap_bounds_logits():
    model = tiny_model(logit_softcap=2.0)
    idx = torch.randint(0, 64, (4, 16))
    with torch.no_grad():
        assert model(idx).abs().max() <= 2.0
        loss = model(idx, idx)
    assert abs(float(loss) - torch.log(torch.tensor(64.0))) < 0.1


def test_every_parameter_has_exactly_one_role():
    model = tiny_model()
    roles = parameter_roles(model)
    ids = [id(p) for group in roles.values() for p in group]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert len(roles["hidden"]) == 2 * 6  # q, k, v, out, up, down per block
    assert all(p.ndim == 2 for p in roles["hidden"])
    assert roles["embed"][0] is model.embed.weight and roles["head"][0] is model.head.weight
    assert all(p.ndim == 1 for p in roles["scalars"])
