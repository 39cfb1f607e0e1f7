"""Networks: PT's state-dict layout, AdaLIN/ILN formulas, spectral norm, shapes and options."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import networks as N

# State-dict names and shapes of the official PyTorch networks (a copy of the design card's
# shared/reference/pt_state_dicts.json, so the check runs on a clean clone too).
REFERENCE = Path(__file__).resolve().parent / 'data' / 'pt_state_dicts.json'


def _reference_models() -> dict:
    return json.loads(REFERENCE.read_text())['models']


@pytest.mark.parametrize('name', ['genA2B_light_img256', 'genA2B_full_img64', 'genA2B_light_img64',
                                  'disGA_n_layers7', 'disLA_n_layers5'])
def test_state_dict_matches_pt_reference(name):
    ref = _reference_models()[name]
    ctor = ref['ctor']
    with torch.device('meta'):  # the full model at 256 is 279 M parameters: shapes only
        if name.startswith('gen'):
            net = N.ResnetGenerator(**ctor)
        else:
            net = N.Discriminator(**ctor)
    got = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    assert got == [(k, list(s)) for k, s in ref['state_dict']]
    assert sum(p.numel() for p in net.parameters()) == ref['n_params']


def test_full_generator_at_256_has_pt_parameter_count():
    ref = _reference_models()['genA2B_full_img256']
    with torch.device('meta'):
        net = N.ResnetGenerator(**ref['ctor'])
    assert sum(p.numel() for p in net.parameters()) == ref['n_params']


def _numpy_lin(x, rho, eps=1e-5):
    in_mean = x.mean(axis=(2, 3), keepdims=True)
    in_var = x.var(axis=(2, 3), keepdims=True, ddof=1)
    ln_mean = x.mean(axis=(1, 2, 3), keepdims=True)
    ln_var = x.var(axis=(1, 2, 3), keepdims=True, ddof=1)
    return rho * (x - in_mean) / np.sqrt(in_var + eps) + (1 - rho) * (x - ln_mean) / np.sqrt(ln_var + eps)


def test_adailn_matches_numpy_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    gamma, beta = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    norm = N.adaILN(4).double()
    with torch.no_grad():
        norm.rho.copy_(torch.tensor([0.0, 0.3, 0.9, 1.0]).view(1, 4, 1, 1))
    out = norm(x, gamma, beta).detach().numpy()
    rho = norm.rho.detach().numpy()
    expected = _numpy_lin(x.numpy(), rho) * gamma.numpy()[:, :, None, None] + beta.numpy()[:, :, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_iln_matches_numpy_formula_and_inits():
    norm = N.ILN(3).double()
    assert torch.all(norm.rho == 0) and torch.all(norm.gamma == 1) and torch.all(norm.beta == 0)
    with torch.no_grad():
        norm.rho.fill_(0.25)
        norm.gamma.copy_(torch.tensor([1.0, 2.0, -1.0]).view(1, 3, 1, 1))
        norm.beta.fill_(0.5)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    expected = _numpy_lin(x.numpy(), 0.25) * norm.gamma.detach().numpy() + 0.5
    np.testing.assert_allclose(norm(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


def test_rho_clipper_clamps_every_rho():
    gen = N.ResnetGenerator(3, 3, ngf=4, n_blocks=1, img_size=16, light=True)
    with torch.no_grad():
        gen.UpBlock1_1.norm1.rho.fill_(1.7)
        gen.UpBlock2[3].rho.fill_(-0.4)
    gen.apply(N.RhoClipper(0, 1))
    assert torch.all(gen.UpBlock1_1.norm1.rho == 1.0)
    assert torch.all(gen.UpBlock2[3].rho == 0.0)


def test_spectral_norm_matches_torch_implementation():
    torch.manual_seed(0)
    ours = N.spectral_norm(nn.Conv2d(3, 5, 4, 2, 0))
    theirs = nn.utils.spectral_norm(nn.Conv2d(3, 5, 4, 2, 0))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):  # training mode: one power iteration per call, as torch does
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.weight_u, theirs.weight_u)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('light', [True, False])
@pytest.mark.parametrize('size', [64, 128, 256])
def test_generator_output_shapes(light, size):
    gen = N.ResnetGenerator(3, 3, ngf=4, n_blocks=2, img_size=size, light=light).eval()
    out = gen(torch.randn(2, 3, size, size))
    assert out.image.shape == (2, 3, size, size)
    assert out.cam_logit.shape == (2, 2)
    assert out.heatmap.shape == (2, 1, size // 4, size // 4)
    assert out.image.abs().max() <= 1


def test_generator_eval_is_deterministic_and_per_sample():
    gen = N.ResnetGenerator(3, 3, ngf=8, n_blocks=2, img_size=32, light=False).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = gen(x), gen(x)
        single = gen(x[1:2])
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    # Every norm is per sample, so batching is exact: the basis of the stacked training step.
    torch.testing.assert_close(a.image[1:2], single.image, rtol=1e-5, atol=1e-6)


def test_discriminator_shapes_match_pt_patch_maps():
    d_global = N.Discriminator(3, ndf=4, n_layers=7).eval()
    d_local = N.Discriminator(3, ndf=4, n_layers=5).eval()
    x = torch.randn(1, 3, 256, 256)
    assert d_global(x).logit.shape == (1, 1, 6, 6)
    assert d_local(x).logit.shape == (1, 1, 30, 30)
    assert d_local(x).cam_logit.shape == (1, 2)
    assert N.min_image_size(7) == 96


def test_discriminator_cam_weights_use_weight_orig_like_pt():
    torch.manual_seed(0)
    d = N.Discriminator(3, ndf=4, n_layers=5).eval()
    x = torch.randn(1, 3, 32, 32)
    out = d(x)
    feats = d.model(x)
    w = d.gap_fc.weight_orig[:, :, None, None]
    wm = d.gmp_fc.weight_orig[:, :, None, None]
    fused = d.leaky_relu(d.conv1x1(torch.cat([feats * w, feats * wm], 1)))
    torch.testing.assert_close(out.logit, d.conv(d.pad(fused)))


def test_pt_checkpoint_loads_strict_and_reproduces_outputs(tmp_path):
    """A checkpoint written by torch's own spectral_norm (PT's code path) loads strictly."""
    torch.manual_seed(1)
    ours = N.Discriminator(3, ndf=4, n_layers=5)
    pt_style = N.Discriminator(3, ndf=4, n_layers=5, sn=False)
    for name, module in list(pt_style.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name != 'conv1x1':
            nn.utils.spectral_norm(module)
    torch.save({'disLA': pt_style.state_dict()}, tmp_path / 'pt.pt')
    ours.load_state_dict(torch.load(tmp_path / 'pt.pt', weights_only=True)['disLA'], strict=True)
    x = torch.randn(2, 3, 32, 32)
    ours.eval()
    pt_style.eval()
    # PT's D weights CAM features by weight_orig; reproduce that on the PT-style module by hand.
    feats = pt_style.model(x)
    w = torch.cat([feats * pt_style.gap_fc.weight_orig[:, :, None, None],
                   feats * pt_style.gmp_fc.weight_orig[:, :, None, None]], 1)
    expected = pt_style.conv(pt_style.pad(pt_style.leaky_relu(pt_style.conv1x1(w))))
    torch.testing.assert_close(ours(x).logit, expected, rtol=1e-5, atol=1e-6)


def test_options_change_architecture_only_when_on():
    base = N.ResnetGenerator(3, 3, ngf=4, n_blocks=1, img_size=32, light=True)
    keys = set(base.state_dict())
    se = N.ResnetGenerator(3, 3, ngf=4, n_blocks=1, img_size=32, light=True, use_se=True)
    assert any('.se.' in k for k in se.state_dict()) and keys < set(se.state_dict())
    pooled = N.ResnetGenerator(3, 3, ngf=4, n_blocks=1, img_size=32, light=2)
    assert pooled.FC[0].weight.shape == (16, 16 * 4)
    deconv = N.ResnetGenerator(3, 3, ngf=4, n_blocks=1, img_size=32, light=True, use_deconv=True)
    assert any(isinstance(m, nn.ConvTranspose2d) for m in deconv.modules())
    assert deconv(torch.randn(1, 3, 32, 32)).image.shape == (1, 3, 32, 32)


def test_light_true_equals_pool_size_one():
    torch.manual_seed(0)
    a = N.ResnetGenerator(3, 3, ngf=4, n_blocks=1, img_size=32, light=True).eval()
    b = N.ResnetGenerator(3, 3, ngf=4, n_blocks=1, img_size=32, light=1).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(a(x).image, b(x).image)


@pytest.mark.parametrize('use_input', [False, True])
def test_attention_fusion_groups_channels_per_candidate(use_input):
    torch.manual_seed(0)
    k = 3
    gen = N.ResnetGenerator(3, 3, ngf=4, n_blocks=1, img_size=16, light=True, attention_gan=k,
                            attention_input=use_input).eval()
    x = torch.randn(2, 3, 16, 16)
    out = gen(x)
    assert out.attention.shape == (2, k, 16, 16)
    torch.testing.assert_close(out.attention.sum(1), torch.ones(2, 16, 16))
    generated = torch.randn(2, 3 * (k - 1 if use_input else k), 16, 16)
    fused = gen._fuse_candidates(generated, x, out.attention)
    cands = ([x] if use_input else []) + list(generated.split(3, dim=1))
    expected = sum(out.attention[:, j:j + 1] * cands[j] for j in range(k))
    torch.testing.assert_close(fused, expected)


def test_discriminator_options():
    x = torch.randn(2, 3, 32, 32)
    d = N.Discriminator(3, ndf=4, n_layers=4, n_groups=4).eval()
    out = d(x)
    assert out.group_logit.shape == (2, 4)
    assert out.logit.shape[-1] == N.discriminator_output_size(32, 4)
    plain = N.Discriminator(3, ndf=4, n_layers=5, sn=False)
    assert not any(k.endswith('weight_orig') for k in plain.state_dict())
    masked = N.Discriminator(3, ndf=4, n_layers=5).eval()
    full = masked(x)
    fea = masked(x, feature_mask=torch.zeros(2, 1, 32, 32))
    torch.testing.assert_close(full.logit, fea.logit)
    assert not torch.allclose(full.cam_logit, fea.cam_logit)
    inp = masked(x, cam_input=torch.zeros_like(x))
    assert not torch.allclose(full.cam_logit, inp.cam_logit)
    no_att = N.Discriminator(3, ndf=4, n_layers=5, cam_attention=False).eval()
    no_att.load_state_dict(masked.state_dict())
    assert not torch.allclose(no_att(x).logit, full.logit)


def test_instance_norm_gradient_is_layout_independent_at_batch_one():
    """Works around a PyTorch CPU bug: wrong instance-norm input gradients for a channels-last
    incoming gradient at batch size 1 (networks.InstanceNorm2d makes that gradient contiguous)."""
    from networks import InstanceNorm2d
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    grad_out = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.grad(torch.nn.InstanceNorm2d(16)(x.requires_grad_(True)), x, grad_out)[0]
    for layout in (torch.contiguous_format, torch.channels_last):
        y = x.detach().contiguous(memory_format=layout).requires_grad_(True)
        got = torch.autograd.grad(InstanceNorm2d(16)(y), y, grad_out.contiguous(memory_format=torch.channels_last))[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _saved_by_autograd(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return module(x), saved


@pytest.mark.parametrize('padding', [1, (1, 2, 1, 2)])
def test_reflection_pad_keeps_the_input_shape_not_the_input(padding):
    """networks.ReflectionPad2d: PyTorch's gradient, bit for bit, without keeping the input alive."""
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    grads, kept = [], []
    for pad in (nn.ReflectionPad2d(padding), N.ReflectionPad2d(padding)):
        out, saved = _saved_by_autograd(pad, x)
        grads.append(torch.autograd.grad(out, x, torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))[0])
        kept.append(sum(t.numel() for t in saved))
    assert torch.equal(grads[0], grads[1])
    assert kept == [x.numel(), 0]


@pytest.mark.parametrize('norm', ['ILN', 'adaILN'])
def test_recomputed_norms_give_the_same_numbers(norm):
    """--recompute's norms: intermediates recomputed in backward from the input, the same values and grads."""
    torch.manual_seed(0)
    module = getattr(N, norm)(4)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    extra = [torch.randn(2, 4, requires_grad=True) for _ in range(2)] if norm == 'adaILN' else []
    results = []
    for recompute in (False, True):
        module.recompute = recompute
        out = module(x, *extra)
        inputs = [x, *extra, *module.parameters()]
        results.append([out, *torch.autograd.grad(out, inputs, torch.ones_like(out) / 3)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_spectral_norm_conv_keeps_no_normalised_weight_after_its_backward():
    """W/σ lives in the graph only: once the backward pass has used it, it is freed (the critics'
    largest is 128 MiB at 256 px; the module's attribute held it until the next forward); the next
    forward computes it again."""
    import weakref
    torch.manual_seed(0)
    conv = N.spectral_norm(nn.Conv2d(3, 4, 3))
    used = []
    conv.register_forward_pre_hook(lambda module, args: used.append(weakref.ref(module.weight)))  # after SN's
    x = torch.randn(1, 3, 6, 6)
    out = conv(x)
    assert used[0]() is not None and conv.weight is None   # alive in the graph only
    out.sum().backward()
    del out
    assert used[0]() is None
    assert conv(x).shape == (1, 4, 4, 4) and len(used) == 2


@pytest.mark.parametrize('light', [True, False])
def test_generators_draw_no_random_numbers(light):
    """--recompute recomputes them without saving and restoring the RNG state (which a captured step,
    --cuda_graph, may not do): that is exact only because a generator's forward and backward draw nothing."""
    from model import ArchConfig, build_generator
    torch.manual_seed(0)
    g = build_generator(ArchConfig(img_size=32, ch=4, n_res=1, light=light)).train()
    x = torch.randn(1, 3, 32, 32)
    before = torch.get_rng_state()
    out = g(x)
    (out.image.sum() + out.cam_logit.sum()).backward()
    assert torch.equal(torch.get_rng_state(), before)
