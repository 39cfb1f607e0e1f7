"""Tests for augment.py: exact blit ops, closed-form warps and colour matrices, p=0 identity,
gradients, firing probabilities, and the ADA p controller."""

import math

import pytest
import torch
import torch.distributed as dist

from augment import (
    ALL_OPS,
    BLIT_OPS,
    COLOUR_OPS,
    GEOM_OPS,
    PIPELINES,
    AdaController,
    AugmentPipe,
    apply_blit,
    apply_colour,
    apply_warp,
    rot90_2d,
    rotate2d,
    rotate3d,
    scale2d,
    translate2d,
    translate3d,
)

LUMA = torch.tensor([1.0, 1.0, 1.0, 0.0]) / math.sqrt(3)


def images(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------- the pipe


@pytest.mark.parametrize('pipeline', sorted(PIPELINES))
def test_p_zero_is_bit_identical(pipeline):
    x = images(3, 3, 12, 20)
    assert torch.equal(AugmentPipe(pipeline, p=0.0)(x, generator=gen()), x)
    assert torch.equal(AugmentPipe(pipeline, p=0.0)(x), x)


@pytest.mark.parametrize('op', ALL_OPS)
def test_each_op_alone_changes_the_image(op):
    x = images(8, 3, 16, 16)
    out = AugmentPipe(ops=[op], p=1.0)(x, generator=gen())
    change = (out - x).flatten(1).abs().amax(dim=1)
    # flip / rot90 / luma flip pick the identity option half or a quarter of the time; xint rounds to 0
    # sometimes; every other op moves every sample
    need = 1 if op in ('xflip', 'rotate90', 'lumaflip', 'xint') else 8
    assert int((change > 1e-2).sum()) >= need


def test_pipe_xflip_gives_flip_or_identity_exactly():
    x = images(16, 3, 8, 8)
    out = AugmentPipe(ops=['xflip'], p=1.0)(x, generator=gen())
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    same = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 0 < sum(flipped) < 16


def test_pipe_rotate90_gives_one_of_four_turns_exactly():
    x = images(16, 3, 8, 8)
    out = AugmentPipe(ops=['rotate90'], p=1.0)(x, generator=gen())
    turns = [next(k for k in range(4) if torch.equal(o, torch.rot90(xi, k, (1, 2)))) for o, xi in zip(out, x)]
    assert len(set(turns)) >= 3


def test_blit_flip_rot90_and_integer_shift_are_exact():
    x = images(2, 3, 6, 6)
    assert torch.equal(apply_blit(x, scale2d(t(-1, -1), t(1, 1))), torch.flip(x, [3]))
    for k in range(4):
        assert torch.equal(apply_blit(x, rot90_2d(t(k, k))), torch.rot90(x, k, (2, 3)))
    shifted = apply_blit(x, translate2d(t(-2, -2), t(0, 0)))  # content moves 2 px right
    assert torch.equal(shifted[..., 2:], x[..., :-2])
    assert torch.equal(shifted[..., :2], x[..., [1, 0]])  # reflected about the left edge


def test_warp_matches_exact_ops_to_float_precision():
    x = images(2, 3, 8, 8)
    turned = apply_warp(x, rotate2d(t(math.pi / 2, math.pi / 2)))
    assert (turned - torch.rot90(x, 1, (2, 3))).abs().max() < 1e-5
    assert (apply_warp(x, torch.eye(3).expand(2, 3, 3)) - x).abs().max() < 1e-5
    shift = translate2d(t(-3, -3), t(1, 1))
    assert (apply_warp(x, shift) - apply_blit(x, shift)).abs().max() < 1e-5


def test_warp_scale_by_half_samples_between_pixels():
    # Output→source scale 0.5 about the centre: output pixel j of a 4-wide row reads source x = 0.5j + 0.75.
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    out = apply_warp(x, scale2d(t(0.5), t(0.5)))
    assert torch.allclose(out[0, 0, 0], t(0.75, 1.25, 1.75, 2.25), atol=1e-6)


def test_colour_matrices_closed_form():
    x = images(2, 3, 5, 5)
    b = t(0.3, -0.1)
    assert torch.allclose(apply_colour(x, translate3d(b)), x + b.view(2, 1, 1, 1), atol=1e-6)
    # 120° about the luma axis cyclically permutes R, G, B
    hue = apply_colour(x, rotate3d(LUMA, t(2 * math.pi / 3, 2 * math.pi / 3)))
    assert torch.allclose(hue, x[:, [2, 0, 1]], atol=1e-5)
    # luma flip negates grey; zero saturation leaves the channel mean
    grey = x[:, :1].expand(2, 3, 5, 5)
    vv = torch.outer(LUMA, LUMA)
    assert torch.allclose(apply_colour(grey, (torch.eye(4) - 2 * vv).expand(2, 4, 4)), -grey, atol=1e-6)
    desat = apply_colour(x, vv.expand(2, 4, 4))
    assert torch.allclose(desat, x.mean(dim=1, keepdim=True).expand_as(x), atol=1e-6)


def test_gradcheck_geometric_warp():
    pipe = AugmentPipe(ops=GEOM_OPS, p=1.0)
    x = images(1, 3, 8, 8, dtype=torch.float64).requires_grad_()

    def fn(inp):
        return pipe(inp, generator=gen(3))

    assert (fn(x) - x).abs().max() > 1e-2  # the warp really fired
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


def test_gradcheck_colour_and_blit():
    x = images(1, 3, 8, 8, dtype=torch.float64).requires_grad_()
    for ops in (COLOUR_OPS, BLIT_OPS):
        pipe = AugmentPipe(ops=ops, p=1.0)

        def fn(inp, pipe=pipe):
            return pipe(inp, generator=gen(1))

        assert (fn(x) - x).abs().max() > 1e-2
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


def test_full_pipe_passes_gradients():
    x = images(2, 3, 16, 16).requires_grad_()
    AugmentPipe('bgc', p=1.0)(x, generator=gen()).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize('shape', [(3, 3, 12, 20), (3, 3, 20, 12), (3, 1, 9, 14), (1, 3, 7, 7)])
def test_shapes_preserved(shape):
    x = images(*shape)
    out = AugmentPipe('bgc', p=1.0)(x, generator=gen())
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.equal(out, x)


def test_generator_makes_it_reproducible():
    x = images(4, 3, 16, 16)
    pipe = AugmentPipe('bgc', p=0.7)
    assert torch.equal(pipe(x, generator=gen(5)), pipe(x, generator=gen(5)))
    assert not torch.equal(pipe(x, generator=gen(5)), pipe(x, generator=gen(6)))


@pytest.mark.parametrize('op', ['scale', 'rotate', 'brightness'])
def test_each_op_fires_with_probability_p(op):
    # 'rotate' has two chances of p_rot = 1 - sqrt(1 - p), so it too fires with probability p overall.
    p, n = 0.3, 4000
    x = images(n, 3, 4, 4)
    out = AugmentPipe(ops=[op], p=p)(x, generator=gen())
    fired = (out != x).flatten(1).any(dim=1).float().mean().item()
    assert abs(fired - p) < 0.03  # ~4 standard errors


def test_p_is_a_float32_buffer_and_validated():
    pipe = AugmentPipe('bg', p=0.25)
    assert pipe.p.dtype == torch.float32 and 'p' in dict(pipe.named_buffers())
    assert pipe.state_dict()['p'].item() == 0.25
    for bad in ({'pipeline': 'x'}, {'p': 1.5}, {'ops': ['blur']}):
        with pytest.raises(ValueError):
            AugmentPipe(**bad)
    with pytest.raises(ValueError):
        AugmentPipe('c', p=1.0)(images(1, 4, 4, 4))


# The pipe's draws from its generator, in order ('u' uniform, 'n' normal, n values each): blit, then
# geometric, then colour ops, each op's values before its coin. A resumed run reseeds the generator
# and must draw exactly the same, so the order may not change, and no draw may depend on p or x.
BGC_DRAWS = ('uu' 'uu' 'uuu'                     # xflip, rotate90, xint
             'nu' 'uu' 'nu' 'uu' 'nnu'           # scale, rotate, aniso, rotate, xfrac
             'nu' 'nu' 'uu' 'uu' 'nu')           # brightness, contrast, lumaflip, hue, saturation
GREY_DRAWS = BGC_DRAWS[:-4]                      # hue and saturation need RGB


@pytest.mark.parametrize('p', [0.0, 0.4, 1.0])
@pytest.mark.parametrize('channels,draws', [(3, BGC_DRAWS), (1, GREY_DRAWS)])
def test_pipe_draws_a_fixed_sequence_from_its_generator(p, channels, draws):
    n = 5
    used = gen(9)
    AugmentPipe('bgc', p=p)(images(n, channels, 8, 8, seed=int(p * 10)), generator=used)
    replay = gen(9)
    for kind in draws:
        (torch.rand if kind == 'u' else torch.randn)(n, generator=replay)
    assert torch.equal(used.get_state(), replay.get_state())


@pytest.mark.parametrize('axis_dtype,theta_dtype', [(torch.float32, torch.float32), (torch.float32, torch.float64),
                                                    (torch.float64, torch.float32), (torch.float64, torch.float64)])
def test_rotate3d_rounds_like_python_float_entries(axis_dtype, theta_dtype):
    """The axis stays on the device (no float() of its entries), with the same numbers as float()s."""
    axis = torch.tensor([0.3, -0.5, 0.81, 0.0], dtype=torch.float64)
    axis = (axis / axis.norm()).to(axis_dtype)
    theta = (torch.rand(64, generator=gen(2), dtype=torch.float64) * 2 - 1).to(theta_dtype) * math.pi
    vx, vy, vz = (float(a) for a in axis[:3])
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    rows = [[vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s],
            [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s],
            [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c]]
    got = rotate3d(axis, theta)
    assert got.dtype == theta_dtype
    assert torch.equal(got[:, :3, :3], torch.stack([torch.stack(r, dim=-1) for r in rows], dim=1))
    assert torch.equal(got[:, 3], torch.tensor([0, 0, 0, 1], dtype=theta_dtype).expand(64, 4))
    assert torch.equal(got[:, :3, 3], torch.zeros(64, 3, dtype=theta_dtype))


def test_rot90_matrix_entries_are_exact_for_any_k():
    k = torch.arange(-4.0, 8.0)
    turns = [(1, 0), (0, 1), (-1, 0), (0, -1)]
    want = torch.tensor([[[c, -s, 0], [s, c, 0], [0, 0, 1]] for c, s in (turns[int(i) % 4] for i in k)],
                        dtype=torch.float32)
    assert torch.equal(rot90_2d(k), want)


# --------------------------------------------------------------------------- the controller


def controller(p=0.0, **kwargs):
    kwargs = {'interval': 4, 'kimg': 500, 'batch_size': 4, **kwargs}
    return AdaController(AugmentPipe('bgc', p=p), **kwargs)


def feed(ada, value, steps, shape=(4, 1, 3, 3)):
    for _ in range(steps):
        ada.observe(torch.full(shape, value))
        ada.step()


def test_step_size_formula():
    assert controller().step_size == pytest.approx(4 * 4 / 500_000)


def test_overconfident_d_raises_p_by_one_step_per_interval():
    ada = controller()
    step = torch.tensor(ada.step_size, dtype=torch.float32).item()
    feed(ada, 0.9, 3)
    assert ada.p == 0.0  # no adjustment before `interval` steps
    feed(ada, 0.9, 1)
    assert ada.p == step and ada.rt == 1.0
    for k in range(2, 6):
        feed(ada, 0.9, 4)
        assert ada.p == pytest.approx(k * step, rel=1e-5)


def test_underconfident_d_lowers_p():
    ada = controller(p=0.5)
    feed(ada, 0.1, 8)
    assert ada.p == pytest.approx(0.5 - 2 * ada.step_size, rel=1e-6)
    assert ada.rt == -1.0


def test_rt_is_mean_sign_over_elements():
    ada = controller(p=0.5, interval=2)
    ada.observe(t(0.9, 0.8, 0.7, 0.2))  # +1 +1 +1 -1
    ada.step()
    ada.observe(t(0.6, 0.1, 0.9, 0.9))  # +1 -1 +1 +1  -> r_t = 4/8 = 0.5 < 0.6
    ada.step()
    assert ada.rt == 0.5
    assert ada.p == pytest.approx(0.5 - ada.step_size, rel=1e-6)


def test_no_observations_leaves_p_alone():
    ada = controller(p=0.3)
    for _ in range(8):
        ada.step()
    assert ada.p == pytest.approx(0.3) and ada.rt == 0.0


def test_p_clamped_to_unit_interval():
    ada = controller(kimg=0.004)  # step = 16 / 4 = 4 per adjustment
    feed(ada, 0.9, 12)
    assert ada.p == 1.0
    feed(ada, 0.0, 12)
    assert ada.p == 0.0


def test_state_round_trips_and_continues_identically(tmp_path):
    ada = controller(p=0.1)
    feed(ada, 0.9, 5)
    ada.observe(torch.full((4, 1, 3, 3), 0.2))  # mid-interval accumulator state
    ada.step()
    torch.save(ada.state_dict(), tmp_path / 'ada.pt')
    restored = controller(p=0.0)
    restored.load_state_dict(torch.load(tmp_path / 'ada.pt', weights_only=True))
    assert restored.p == ada.p and restored.calls == ada.calls == 6 and restored.rt == ada.rt
    for value in (0.9, 0.3, 0.9, 0.9, 0.1, 0.9, 0.9):
        for c in (ada, restored):
            feed(c, value, 1)
        assert restored.p == ada.p and restored.rt == ada.rt


def test_distributed_all_reduce_path(tmp_path):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip('needs torch.distributed and no group already running')
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        ada = controller()
        feed(ada, 0.9, 4)
    finally:
        dist.destroy_process_group()
    assert ada.p == torch.tensor(ada.step_size, dtype=torch.float32).item() and ada.rt == 1.0
