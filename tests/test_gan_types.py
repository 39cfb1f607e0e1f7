"""TF's --gan_type objectives and gradient penalties against hand computations of TF's formulas
(ops.py discriminator_loss/generator_loss, UGATIT.py gradient_panalty), and short training runs."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import random_batches, tiny_trainer
from torch import nn

import losses
import main
from networks import Discriminator, DiscriminatorOutput

LOGIT = [0.5, -1.0, 2.0, 0.0]          # a 1×1×2×2 patch map
CAM = [1.5, -0.5]                       # a 1×2 CAM logit


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# TF's element formulas, written out for plain floats: (D on real, D on fake, G on fake).
HAND = {
    'lsgan': (lambda x: (x - 1) ** 2, lambda x: x ** 2, lambda x: (x - 1) ** 2),
    'gan': (lambda x: _softplus(-x), lambda x: _softplus(x), lambda x: _softplus(-x)),
    'dragan': (lambda x: _softplus(-x), lambda x: _softplus(x), lambda x: _softplus(-x)),
    'wgan-gp': (lambda x: -x, lambda x: x, lambda x: -x),
    'wgan-lp': (lambda x: -x, lambda x: x, lambda x: -x),
    'hinge': (lambda x: max(0.0, 1 - x), lambda x: max(0.0, 1 + x), lambda x: -x),
}


def _outputs() -> list[DiscriminatorOutput]:
    out = DiscriminatorOutput(torch.tensor(LOGIT).reshape(1, 1, 2, 2), torch.tensor([CAM]), torch.zeros(1))
    return [out, out]   # two critic scales


def _mean(f, values) -> float:
    return sum(f(v) for v in values) / len(values)


@pytest.mark.parametrize('gan_type', losses.GAN_TYPES)
@pytest.mark.parametrize('cam_weight', [1.0, 0.5, -1.0])
def test_objective_matches_tf_formula(gan_type, cam_weight):
    objective, _ = losses.gan_objective(gan_type)
    gan = losses.GANLoss(cam_weight, objective)
    for role, f in zip((gan.d_real, gan.d_fake, gan.g), HAND[gan_type]):
        cam_part = cam_weight * _mean(f, CAM) if cam_weight > 0 else 0.0
        want = 2 * (_mean(f, LOGIT) + cam_part)
        assert role(_outputs()).item() == pytest.approx(want, rel=1e-6, abs=1e-6), role.__name__


@pytest.mark.parametrize('gan_type', losses.GAN_TYPES)
def test_patch_mask_zeroes_background_for_every_objective(gan_type):
    objective, _ = losses.gan_objective(gan_type)
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.5]]]])
    logit = torch.tensor(LOGIT).reshape(1, 1, 2, 2)
    weights = [1.0, 0.0, 1.0, 0.25]    # m²: what LSGAN's replace-by-target masking amounts to
    for role, f in zip((objective.d_real, objective.d_fake, objective.g_fake), HAND[gan_type]):
        want = sum(w * f(x) for w, x in zip(weights, LOGIT)) / 4
        assert role(logit, mask).item() == pytest.approx(want, rel=1e-6, abs=1e-6)


class QuadraticCritic(nn.Module):
    """logit = s/2·Σx² per image (∇ = s·x̂) and cam_logit = [Σ a·x, Σ b·x] (∇ of the sum = a + b)."""

    def __init__(self, shape, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        g = torch.Generator().manual_seed(5)
        self.a = nn.Parameter(torch.rand(shape, generator=g) * 0.2)
        self.b = nn.Parameter(torch.rand(shape, generator=g) * 0.2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        logit = (self.scale / 2 * x.square().flatten(1).sum(1)).reshape(-1, 1, 1, 1)
        cam = torch.stack([(self.a * x).flatten(1).sum(1), (self.b * x).flatten(1).sum(1)], dim=1)
        return DiscriminatorOutput(logit, cam, torch.zeros(1))


def _hand_penalty(norms: list[float], one_sided: bool) -> float:
    excess = [max(0.0, n - 1) if one_sided else n - 1 for n in norms]
    return sum(e * e for e in excess) / len(excess)


@pytest.mark.parametrize('gan_type', ['wgan-gp', 'wgan-lp', 'dragan'])
@pytest.mark.parametrize('scale', [0.3, 2.0])
def test_gradient_penalty_matches_tf_formula_and_trains_the_critic(gan_type, scale):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1
    fake = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1
    _, penalty = losses.gan_objective(gan_type, gp_weight=7.0)
    gan = losses.GANLoss(0.5, penalty=penalty)
    critic = QuadraticCritic(real.shape[1:], scale)
    value = gan.gradient_penalty([critic], real, fake, torch.Generator().manual_seed(1))

    points = critic.seen[0]
    if gan_type == 'dragan':   # real + α·0.5·std(real)·U[0,1): between real and real + 0.5·std
        step = points - real
        assert (step >= -1e-7).all() and (step <= 0.5 * real.std(unbiased=False) + 1e-6).all()
        assert step.flatten(1).std(1).min() > 0   # noise per pixel, not one shift
    else:                      # real + α·(fake − real), one α per image
        alpha = (points - real) / (fake - real)
        assert torch.allclose(alpha, alpha.flatten(1)[:, :1, None, None].expand_as(alpha), atol=1e-5)
        assert (alpha >= 0).all() and (alpha < 1).all()
    one_sided = gan_type == 'wgan-lp'
    norms = [scale * p.norm().item() for p in points]
    cam_norm = (critic.a + critic.b).norm().item()
    want = 7.0 * _hand_penalty(norms, one_sided) + 0.5 * 7.0 * _hand_penalty([cam_norm] * 3, one_sided)
    assert value.item() == pytest.approx(want, rel=1e-5)

    value.backward()           # the penalty trains the critic: d/ds of 7·mean((s‖x̂‖ − 1)²)
    grad_norms = [p.norm().item() for p in points]
    excess = [max(0.0, scale * n - 1) if one_sided else scale * n - 1 for n in grad_norms]
    want_grad = 7.0 * sum(2 * e * n for e, n in zip(excess, grad_norms)) / 3
    assert critic.scale.grad.item() == pytest.approx(want_grad, rel=1e-5, abs=1e-7)


def test_wgan_lp_is_zero_when_the_critic_is_1_lipschitz():
    _, penalty = losses.gan_objective('wgan-lp')
    critic = QuadraticCritic((3, 2, 2), 1e-3)
    with torch.no_grad():
        critic.a.fill_(0.01)
        critic.b.fill_(0.01)
    real, fake = torch.ones(2, 3, 2, 2), -torch.ones(2, 3, 2, 2)
    assert losses.GANLoss(1.0, penalty=penalty).gradient_penalty([critic], real, fake).item() == 0.0


def test_penalty_flows_into_a_real_discriminator():
    torch.manual_seed(0)
    net = Discriminator(3, ndf=4, n_layers=4)
    real, fake = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for _ in range(20):    # converge spectral norm's power iteration, as training does
            net(real)
    _, penalty = losses.gan_objective('wgan-gp')
    value = losses.GANLoss(1.0, penalty=penalty).gradient_penalty([net.eval()], real, fake)
    value.backward()
    assert math.isfinite(value.item()) and value.item() > 0
    # Every kernel gets a gradient (biases need not: ∇ₓD of a piecewise-linear net ignores them).
    kernels = losses.kernels(net)
    assert len(kernels) == 8 and all(k.grad is not None and k.grad.abs().sum() > 0 for k in kernels)


def test_no_penalty_for_gan_lsgan_hinge():
    for gan_type in ('gan', 'lsgan', 'hinge'):
        assert losses.gan_objective(gan_type)[1] is None
    assert losses.GANLoss(1.0).gradient_penalty([], torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 2)).item() == 0.0


# ----------------------------------------------------------------------------------------------
# Training with each objective

ARCHS = ['pt', 'tf']
ARCH_FLAGS = {'pt': (), 'tf': ('--arch', 'tf', '--n_res', '4')}


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('gan_type', losses.GAN_TYPES)
def test_three_training_steps_per_gan_type(tiny_dataset, tmp_path, gan_type, arch):
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--gan_type', gan_type, *ARCH_FLAGS[arch])
    before = {k: v.clone() for k, v in trainer.D.state_dict().items()}
    for step, batch in enumerate(random_batches(3), start=1):
        logs = trainer.train_step(batch, step)
        assert all(torch.isfinite(v).all() for v in logs.values()), logs
    assert ('D/gp_A' in logs) == (gan_type in ('wgan-gp', 'wgan-lp', 'dragan'))
    assert any(not torch.equal(before[k], v) for k, v in trainer.D.state_dict().items())


def test_gan_type_runs_through_the_cli(tiny_dataset, tmp_path):
    from conftest import tiny_flags
    assert main.main(tiny_flags(tiny_dataset, tmp_path / 'r', '--iteration', '3', '--save_freq', '3',
                                '--gan_type', 'wgan-gp', '--GP_ld', '5')) == 0
    state = torch.load(tmp_path / 'r' / 'tiny' / 'model' / 'tiny_params_0000003.pt', weights_only=True)
    assert state['config']['gan_type'] == 'wgan-gp' and state['config']['GP_ld'] == 5.0


def test_penalty_weight_scales_only_the_penalty(tiny_dataset, tmp_path):
    batch = random_batches(1)[0]
    logs = [tiny_trainer(tiny_dataset, tmp_path, '--gan_type', 'wgan-gp', '--GP_ld', ld).train_step(batch, 1)
            for ld in ('10', '20')]
    torch.testing.assert_close(logs[1]['D/gp_A'], 2 * logs[0]['D/gp_A'], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs[1]['D/adv_A'] - logs[1]['D/gp_A'], logs[0]['D/adv_A'] - logs[0]['D/gp_A'],
                               rtol=1e-5, atol=1e-6)
