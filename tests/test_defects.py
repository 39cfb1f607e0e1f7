"""Regression tests for the defects found in review (issue: "Right by default"), one per defect."""
from __future__ import annotations

import torch

from augment import AugmentPipe


def test_ada_pipe_is_exact_under_bf16_autocast():
    """Defect 1: inside bf16 autocast the pipe's sampling grid was bf16, so a 256-px x-flip read
    columns ...128, 130, 130, 132... instead of the mirror image."""
    x = torch.rand(8, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pipe = AugmentPipe('b', p=1.0, ops=['xflip', 'xint'])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = pipe(x, generator=torch.Generator().manual_seed(1))
    assert out.dtype == x.dtype
    # Each sample is either mirrored or not (StyleGAN2-ADA's flip is a coin even when the op fires),
    # then shifted by whole pixels: every output row is an exact permutation of input values.
    reference = pipe(x, generator=torch.Generator().manual_seed(1))
    assert any(not torch.equal(reference[i], x[i]) for i in range(len(x)))
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_ada_warp_matches_float32_under_bf16_autocast():
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pipe = AugmentPipe('g', p=1.0, ops=['rotate', 'xfrac'])
    reference = pipe(x, generator=torch.Generator().manual_seed(3))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = pipe(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
