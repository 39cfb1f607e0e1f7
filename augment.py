"""ADA (Karras et al. 2020) in its own module: one self-contained augment pipe + p controller for D inputs.

`AugmentPipe` follows StyleGAN2-ADA's augment pipe: per sample, each enabled transform fires
independently with probability p; blit ops (x-flip, 90° rotations, integer translation) are lossless
and applied as one exact pixel gather, geometric ops compose into one 3×3 matrix applied with a single
bilinear `grid_sample` (reflection padding), and colour ops compose into one 4×4 matrix. Unlike the
original there is no 2× wavelet supersampling around the warp, so the warp aliases slightly more.
Matrices map *output* pixel coordinates (centred, in pixels) to *source* coordinates.

`AdaController` adjusts p from r_t = E[sign(D(real) - 0.5)] (LSGAN targets 0/1).

Nothing on the pipe's or the controller's per-step path synchronises host and device (it runs four
times per training step): no tensor values are read on the host (`float()`, `.item()`, `if t:`),
and no device tensor is built from Python data, which on CUDA is a blocking host→device copy.
Constants are filled on the device or copied there once and cached (`_on_device`); decisions
that depend on drawn values are `torch.where`s. Only the logging properties `p` and `rt` sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

BLIT_OPS = ('xflip', 'rotate90', 'xint')
GEOM_OPS = ('scale', 'rotate', 'aniso', 'xfrac')
COLOUR_OPS = ('brightness', 'contrast', 'lumaflip', 'hue', 'saturation')
ALL_OPS = BLIT_OPS + GEOM_OPS + COLOUR_OPS
PIPELINES = {
    'b': BLIT_OPS,
    'g': GEOM_OPS,
    'c': COLOUR_OPS,
    'bg': BLIT_OPS + GEOM_OPS,
    'bgc': ALL_OPS,
}

# StyleGAN2-ADA's strengths: lognormal stds are in octaves (exp2), translations in image fractions.
XINT_MAX = 0.125
SCALE_STD = 0.2
ANISO_STD = 0.2
XFRAC_STD = 0.125
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5
SATURATION_STD = 1.0
_LUMA = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(3)

_DEVICE_CONSTANTS: dict[tuple, Tensor] = {}


def _on_device(key: tuple, build: Callable[[], Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """`build()` (a CPU tensor) in `dtype` on `device`, copied there on first use only: a copy from
    the host blocks on CUDA. Shared between calls, so callers must not modify it in place."""
    full_key = (*key, dtype, torch.device(device))
    cached = _DEVICE_CONSTANTS.get(full_key)
    if cached is None:
        cached = _DEVICE_CONSTANTS[full_key] = build().to(dtype).to(device)
    return cached


# --------------------------------------------------------------------------- matrices


def _batch_matrix(rows: Sequence[Sequence[Tensor | float]], ref: Tensor) -> Tensor:
    """Stacks rows of per-sample [N] tensors or constants into an N×R×C matrix like `ref`.

    Constants are filled on ref's device, one fill per distinct value (torch.as_tensor(0,
    device=cuda) would be a blocking host→device copy per entry).
    """
    n = ref.shape[0]
    fills: dict[str, Tensor] = {}

    def column(e: Tensor | float) -> Tensor:
        if isinstance(e, Tensor):
            return e.to(ref.device, ref.dtype).expand(n)
        key = float(e).hex()  # tells 0.0 from -0.0
        if key not in fills:
            fills[key] = ref.new_full((n,), e)
        return fills[key]

    elems = [column(e) for row in rows for e in row]
    return torch.stack(elems, dim=-1).reshape(n, len(rows), len(rows[0]))


def translate2d(tx: Tensor, ty: Tensor) -> Tensor:
    """N×3×3 homogeneous 2-D translation."""
    return _batch_matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def scale2d(sx: Tensor, sy: Tensor) -> Tensor:
    """N×3×3 homogeneous 2-D scaling."""
    return _batch_matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def rotate2d(theta: Tensor) -> Tensor:
    """N×3×3 homogeneous 2-D rotation by `theta` radians."""
    return _rotation2d(torch.cos(theta), torch.sin(theta))


def _rotation2d(cos: Tensor, sin: Tensor) -> Tensor:
    return _batch_matrix([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], cos)


def rot90_2d(k: Tensor) -> Tensor:
    """N×3×3 rotation by k·90° with exact 0/±1 entries (cos/sin of π/2 would not be exact)."""
    idx = k.long() % 4
    # cos = 1, 0, -1, 0 and sin = 0, 1, 0, -1 for idx 0..3, from comparisons (no table to upload)
    cos = (idx == 0).to(k.dtype) - (idx == 2).to(k.dtype)
    sin = (idx == 1).to(k.dtype) - (idx == 3).to(k.dtype)
    return _rotation2d(cos, sin)


def translate3d(t: Tensor) -> Tensor:
    """N×4×4 homogeneous colour offset `t` added to every channel."""
    return _batch_matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], t)


def scale3d(s: Tensor) -> Tensor:
    """N×4×4 homogeneous uniform colour scaling."""
    return _batch_matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], s)


def rotate3d(axis: Tensor, theta: Tensor) -> Tensor:
    """N×4×4 rotation by `theta` around the unit 3-vector `axis` (Rodrigues' formula).

    The axis stays a tensor (float() of its entries would wait for the device). Its products
    v_i·v_j are formed in the wider of the two dtypes and so round exactly as Python-float
    products of the entries do when they meet `theta`.
    """
    v = axis[:3].to(torch.promote_types(axis.dtype, theta.dtype))
    vv = torch.outer(v, v)
    vx, vy, vz = v.unbind()
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    return _batch_matrix(
        [
            [vv[0, 0] * cc + c, vv[0, 1] * cc - vz * s, vv[0, 2] * cc + vy * s, 0],
            [vv[1, 0] * cc + vz * s, vv[1, 1] * cc + c, vv[1, 2] * cc - vx * s, 0],
            [vv[2, 0] * cc - vy * s, vv[2, 1] * cc + vx * s, vv[2, 2] * cc + c, 0],
            [0, 0, 0, 1],
        ],
        theta,
    )


# --------------------------------------------------------------------------- appliers


def _centred_pixels(h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(H·W)×3 homogeneous pixel-centre coordinates, origin at the image centre."""
    ys = torch.arange(h, dtype=dtype, device=device) + 0.5 - h / 2
    xs = torch.arange(w, dtype=dtype, device=device) + 0.5 - w / 2
    gy, gx = torch.meshgrid(ys, xs, indexing='ij')
    return torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).reshape(-1, 3)


def _reflect_index(i: Tensor, n: int) -> Tensor:
    """Mirrors integer indices about the image edges, as grid_sample's reflection padding does."""
    i = torch.remainder(i, 2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def apply_blit(x: Tensor, matrix: Tensor) -> Tensor:
    """Exact pixel gather through an integer-valued N×3×3 matrix (flips, k·90°, integer shifts).

    Source positions are rounded, so square images are bit-exact; a 90° turn of a non-square
    image with H and W of different parity lands half a pixel off and is rounded.
    """
    n, c, h, w = x.shape
    src = _centred_pixels(h, w, matrix.dtype, x.device) @ matrix.transpose(1, 2)  # N×HW×3
    ix = _reflect_index(torch.floor(src[..., 0] + w / 2).long(), w)  # +w/2-0.5, then round half up
    iy = _reflect_index(torch.floor(src[..., 1] + h / 2).long(), h)
    index = (iy * w + ix).unsqueeze(1).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, index).reshape(n, c, h, w)


def _diag(*values: float) -> Tensor:
    return torch.diag(torch.tensor(values, dtype=torch.float64))


def apply_warp(x: Tensor, matrix: Tensor) -> Tensor:
    """Bilinear warp by an N×3×3 output→source pixel matrix, reflection padding; differentiable in x."""
    n, c, h, w = x.shape
    to_norm = _on_device(('to_norm', h, w), lambda: _diag(2 / w, 2 / h, 1.0), matrix.dtype, matrix.device)
    from_norm = _on_device(('from_norm', h, w), lambda: _diag(w / 2, h / 2, 1.0), matrix.dtype, matrix.device)
    theta = (to_norm @ matrix @ from_norm)[:, :2, :].to(x.dtype)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=False)


def apply_colour(x: Tensor, matrix: Tensor) -> Tensor:
    """Applies an N×4×4 homogeneous colour matrix to RGB (or, averaged, to 1-channel) images."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    matrix = matrix.to(x.dtype)
    if c == 3:
        out = matrix[:, :3, :3] @ flat + matrix[:, :3, 3:]
    elif c == 1:  # a grey channel sees the mean of the RGB rows
        m = matrix[:, :3, :].mean(dim=1, keepdim=True)
        out = flat * m[:, :, :3].sum(dim=2, keepdim=True) + m[:, :, 3:]
    else:
        raise ValueError(f'colour augmentation needs 1 or 3 channels, got {c}')
    return out.reshape(n, c, h, w)


# --------------------------------------------------------------------------- sampling


class _Sampler:
    """Per-sample random draws for one batch, from an optional generator, in a fixed order."""

    def __init__(self, n: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None):
        self.n, self.device, self.dtype, self.generator = n, device, dtype, generator

    def _draw(self, fn) -> Tensor:
        if self.generator is None:
            out = fn(self.n, device=self.device)
        else:  # draw where the generator lives, so one CPU generator can drive a CUDA batch
            out = fn(self.n, generator=self.generator, device=self.generator.device)
        return out.to(self.device, self.dtype)  # float32 draws: same numbers for any image dtype

    def uniform(self) -> Tensor:
        return self._draw(torch.rand)

    def normal(self) -> Tensor:
        return self._draw(torch.randn)

    def coin(self, prob: Tensor) -> Tensor:
        """Boolean [N]: True with probability `prob` per sample."""
        return self.uniform() < prob


def _keep(on: Tensor, value: Tensor, neutral: float) -> Tensor:
    return torch.where(on, value, neutral)  # a Python scalar is passed to the kernel, not copied


def _sample_blit(ops: Iterable[str], draw: _Sampler, p: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Integer output→source matrix and the per-sample 'any op fired' mask."""
    eye = torch.eye(3, dtype=draw.dtype, device=draw.device).expand(draw.n, 3, 3)
    mat, fired = eye, torch.zeros(draw.n, dtype=torch.bool, device=draw.device)
    if 'xflip' in ops:  # when it fires, flip or not with equal odds (StyleGAN2-ADA)
        i = torch.floor(draw.uniform() * 2)
        on = draw.coin(p)
        mat, fired = mat @ scale2d(1 - 2 * _keep(on, i, 0), torch.ones_like(i)), fired | on
    if 'rotate90' in ops:
        k = torch.floor(draw.uniform() * 4)
        on = draw.coin(p)
        mat, fired = mat @ rot90_2d(_keep(on, k, 0)), fired | on
    if 'xint' in ops:
        tx = (draw.uniform() * 2 - 1) * XINT_MAX
        ty = (draw.uniform() * 2 - 1) * XINT_MAX
        on = draw.coin(p)
        shift = translate2d(-torch.round(_keep(on, tx, 0) * w), -torch.round(_keep(on, ty, 0) * h))
        mat, fired = mat @ shift, fired | on
    return mat, fired


def _sample_geom(ops: Iterable[str], draw: _Sampler, p: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Output→source warp matrix (scale, rotate, anisotropic scale, rotate, translate) and mask."""
    eye = torch.eye(3, dtype=draw.dtype, device=draw.device).expand(draw.n, 3, 3)
    mat, fired = eye, torch.zeros(draw.n, dtype=torch.bool, device=draw.device)
    # Two rotation chances with p_rot each make "any rotation" fire with probability p.
    p_rot = 1 - torch.sqrt(1 - p.clamp(0, 1))

    def rotation() -> tuple[Tensor, Tensor]:
        theta = (draw.uniform() * 2 - 1) * math.pi
        on = draw.coin(p_rot)
        return rotate2d(-_keep(on, theta, 0)), on

    if 'scale' in ops:
        s = torch.exp2(draw.normal() * SCALE_STD)
        on = draw.coin(p)
        s = _keep(on, s, 1)
        mat, fired = mat @ scale2d(1 / s, 1 / s), fired | on
    if 'rotate' in ops:
        rot, on = rotation()
        mat, fired = mat @ rot, fired | on
    if 'aniso' in ops:
        s = torch.exp2(draw.normal() * ANISO_STD)
        on = draw.coin(p)
        s = _keep(on, s, 1)
        mat, fired = mat @ scale2d(1 / s, s), fired | on
    if 'rotate' in ops:
        rot, on = rotation()
        mat, fired = mat @ rot, fired | on
    if 'xfrac' in ops:
        tx, ty = draw.normal() * XFRAC_STD, draw.normal() * XFRAC_STD
        on = draw.coin(p)
        mat, fired = mat @ translate2d(-_keep(on, tx, 0) * w, -_keep(on, ty, 0) * h), fired | on
    return mat, fired


def _sample_colour(ops: Iterable[str], draw: _Sampler, p: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """4×4 colour matrix per sample (applied right to left) and mask; hue/saturation need RGB."""
    eye = torch.eye(4, dtype=draw.dtype, device=draw.device)
    mat, fired = eye.expand(draw.n, 4, 4), torch.zeros(draw.n, dtype=torch.bool, device=draw.device)
    v = _on_device(('luma',), lambda: _LUMA, draw.dtype, draw.device)
    vv = torch.outer(v, v)
    if 'brightness' in ops:
        b = draw.normal() * BRIGHTNESS_STD
        on = draw.coin(p)
        mat, fired = translate3d(_keep(on, b, 0)) @ mat, fired | on
    if 'contrast' in ops:
        c = torch.exp2(draw.normal() * CONTRAST_STD)
        on = draw.coin(p)
        mat, fired = scale3d(_keep(on, c, 1)) @ mat, fired | on
    if 'lumaflip' in ops:  # Householder reflection of the luma component, flip or not with equal odds
        i = torch.floor(draw.uniform() * 2)
        on = draw.coin(p)
        mat, fired = (eye - 2 * vv * _keep(on, i, 0)[:, None, None]) @ mat, fired | on
    if 'hue' in ops and channels > 1:
        theta = (draw.uniform() * 2 - 1) * math.pi
        on = draw.coin(p)
        mat, fired = rotate3d(v, _keep(on, theta, 0)) @ mat, fired | on
    if 'saturation' in ops and channels > 1:
        s = torch.exp2(draw.normal() * SATURATION_STD)
        on = draw.coin(p)
        mat, fired = (vv + (eye - vv) * _keep(on, s, 1)[:, None, None]) @ mat, fired | on
    return mat, fired


# --------------------------------------------------------------------------- modules


class AugmentPipe(nn.Module):
    """StyleGAN2-ADA augmentation of N×C×H×W images in [-1, 1]; identity at p = 0, differentiable in x.

    Args:
        pipeline: 'b' (blit), 'g' (geometric), 'c' (colour), 'bg' or 'bgc'.
        p: initial augmentation probability, stored as a float32 buffer.
        ops: if given, exactly these ops (names from ALL_OPS) instead of the pipeline's.
    """

    def __init__(self, pipeline: str = 'bgc', p: float = 0.0, ops: Iterable[str] | None = None):
        super().__init__()
        if pipeline not in PIPELINES:
            raise ValueError(f'pipeline must be one of {sorted(PIPELINES)}, got {pipeline!r}')
        if not 0.0 <= p <= 1.0:
            raise ValueError(f'p must lie in [0, 1], got {p}')
        chosen = PIPELINES[pipeline] if ops is None else tuple(ops)
        unknown = sorted(set(chosen) - set(ALL_OPS))
        if unknown:
            raise ValueError(f'unknown augmentation ops {unknown}; choose from {ALL_OPS}')
        self.pipeline = pipeline
        self.ops = tuple(op for op in ALL_OPS if op in chosen)
        self.register_buffer('p', torch.tensor(p, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f'ops={self.ops}, p={float(self.p):.4f}'

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augments each sample independently; samples where no op fired are returned bit-identical."""
        if x.ndim != 4:
            raise ValueError(f'expected N×C×H×W images, got shape {tuple(x.shape)}')
        # Sampling coordinates must be exact: under bf16 autocast a 256-px flip or integer shift
        # read the wrong columns and the warp grid was off by up to 0.6 px. The pipe runs in
        # float32 (float64 stays) whatever the caller's autocast, and returns the input's dtype.
        with torch.autocast(x.device.type, enabled=False):
            out = self._augment(x if x.dtype == torch.float64 else x.float(), generator)
        return out.to(x.dtype)

    def _augment(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        n, c, h, w = x.shape
        dtype = x.dtype
        draw = _Sampler(n, x.device, dtype, generator)
        p = self.p.to(x.device)
        stages = (
            (BLIT_OPS, lambda ops: _sample_blit(ops, draw, p, h, w), apply_blit),
            (GEOM_OPS, lambda ops: _sample_geom(ops, draw, p, h, w), apply_warp),
            (COLOUR_OPS, lambda ops: _sample_colour(ops, draw, p, c), apply_colour),
        )
        for names, sample, apply in stages:
            ops = [op for op in self.ops if op in names]
            if ops:
                matrix, fired = sample(ops)
                # where() instead of a host-side `if p > 0`: no GPU sync, exact identity when nothing fired
                x = torch.where(fired.view(n, 1, 1, 1), apply(x, matrix), x)
        return x


class AdaController:
    """Adapts `pipe.p` from the sign of D's real logits, as StyleGAN2-ADA does.

    Call `observe(real_logits)` for every real batch D sees and `step()` once per D step. Every
    `interval` steps, r_t = mean(sign(logits - threshold)) over the observed elements (summed over
    ranks when torch.distributed is initialised, so every rank must call `step()` equally often) and
    p <- clamp(p + sign(r_t - target) * batch_size * interval / (kimg * 1000), 0, 1).

    Args:
        pipe: the pipe whose `p` buffer is adjusted in place.
        target: r_t above which D is judged to overfit (0.6).
        interval: D steps between adjustments.
        kimg: thousands of images for p to move by 1.
        batch_size: images per D step across all ranks.
        threshold: D's decision boundary on real logits (0.5 for LSGAN targets 0/1).
    """

    def __init__(
        self,
        pipe: AugmentPipe,
        target: float = 0.6,
        interval: int = 4,
        kimg: float = 500.0,
        batch_size: int = 1,
        threshold: float = 0.5,
    ):
        if interval < 1 or batch_size < 1 or kimg <= 0:
            raise ValueError('interval and batch_size must be >= 1 and kimg > 0')
        self.pipe = pipe
        self.target, self.interval, self.kimg = target, interval, kimg
        self.batch_size, self.threshold = batch_size, threshold
        self.calls = 0
        device = pipe.p.device
        self._acc = torch.zeros(2, device=device)  # [sum of signs, element count]; float32 is exact to 2^24
        self._rt = torch.zeros((), device=device)

    @property
    def step_size(self) -> float:
        """Change of p per adjustment."""
        return self.batch_size * self.interval / (self.kimg * 1000)

    @property
    def p(self) -> float:
        """Current augmentation probability (a host sync; for logging)."""
        return float(self.pipe.p)

    @property
    def rt(self) -> float:
        """r_t of the last adjustment, 0.0 before the first (a host sync; for logging)."""
        return float(self._rt)

    @torch.no_grad()
    def observe(self, real_logits: Tensor) -> None:
        """Accumulates sign(real_logits - threshold) on device, without a host sync."""
        logits = real_logits.detach()
        if self._acc.device != logits.device:
            self._acc = self._acc.to(logits.device)
        self._acc[0] += torch.sign(logits.float() - self.threshold).sum()
        self._acc[1] += logits.numel()

    @torch.no_grad()
    def step(self) -> None:
        """Counts one D step; every `interval` steps adjusts p and resets the accumulators."""
        self.calls += 1
        if self.calls % self.interval:
            return
        p = self.pipe.p
        acc = self._acc.to(p.device).clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(acc)
        signs, count = acc[0], acc[1]
        rt = signs / count.clamp(min=1)
        seen = count > 0  # nothing observed: leave p and r_t alone
        adjust = torch.sign(rt - self.target) * self.step_size
        p.copy_(torch.where(seen, p + adjust, p).clamp(0, 1))
        self._rt = torch.where(seen, rt, self._rt.to(p.device))
        self._acc.zero_()

    def running_tensors(self) -> list[Tensor]:
        """What :meth:`observe` changes in place during a D step (a trainer undoing a failed step
        restores them)."""
        return [self._acc]

    def state_dict(self) -> dict[str, Tensor | int]:
        """p, accumulators, last r_t and step counter; plain tensors/ints (weights_only-safe)."""
        return {
            'p': self.pipe.p.detach().clone(),
            'acc': self._acc.clone(),
            'rt': self._rt.clone(),
            'calls': self.calls,
        }

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        """Restores what `state_dict` saved, onto the pipe's device."""
        device = self.pipe.p.device
        self.pipe.p.copy_(torch.as_tensor(state['p']))
        self._acc = torch.as_tensor(state['acc'], dtype=torch.float32).to(device).clone()
        self._rt = torch.as_tensor(state['rt'], dtype=torch.float32).to(device).clone()
        self.calls = int(state['calls'])


@dataclass(frozen=True)
class AdaOptions:
    """F2W's --ada_* flags; ``batch_size`` counts the images of all ranks per D step."""

    pipeline: str = 'bgc'
    p: float = 0.0
    target: float = 0.6
    interval: int = 4
    kimg: float = 500
    batch_size: int = 1


def build_controllers(options: AdaOptions, device: torch.device, threshold: float = 0.5
                      ) -> dict[str, AdaController]:
    """One ADA controller per domain's discriminators (F2W's ``ada`` and ``ada2``); ``threshold``
    is the GAN objective's real/fake boundary on D's logits."""
    return {dom: AdaController(AugmentPipe(options.pipeline, p=options.p).to(device), target=options.target,
                               interval=options.interval, kimg=options.kimg, batch_size=options.batch_size,
                               threshold=threshold)
            for dom in 'AB'}
