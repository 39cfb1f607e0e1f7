"""Tests for metrics/: FID/KID against direct references, Inception loading, folders, cache, CLI."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import pytorch_fid.inception
import torch
from PIL import Image
from pytorch_fid import fid_score
from pytorch_fid.fid_score import calculate_frechet_distance, get_activations
from scipy import linalg
from torchvision.transforms.functional import to_tensor

from metrics import (
    Evaluator,
    FeatureCache,
    MetricsError,
    build_inception,
    feature_statistics,
    fid_inception_backbone,
    folder_features,
    frechet_distance,
    image_files,
    inception_features,
    kernel_inception_distance,
)
from metrics import evaluator as evaluator_module
from metrics.__main__ import main
from metrics.inception import pool3_model, unit_range_features

# ---------------------------------------------------------------- helpers and fixtures

def _calibrated_backbone(seed: int = 0) -> torch.nn.Module:
    """A random FID backbone whose BatchNorm statistics keep activations O(1) on tiny test images."""
    torch.manual_seed(seed)
    backbone = fid_inception_backbone()
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch sets the running stats
            module.reset_running_stats()
    model = pool3_model(backbone).train()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))
    return backbone.eval()


def _write_pngs(folder: Path, count: int, size: tuple[int, int] = (32, 32), seed: int = 0,
                shift: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = np.clip(rng.integers(0, 256, (size[1], size[0], 3)) + shift, 0, 255).astype(np.uint8)
        paths.append(folder / f'img_{i:02d}.png')
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp('weights') / 'random_fid_inception.pth'
    torch.save(_calibrated_backbone().state_dict(), path)
    return path


@pytest.fixture(scope='module')
def model(weights_file: Path) -> torch.nn.Module:
    return build_inception(str(weights_file))


@pytest.fixture
def pytorch_fid_loads(weights_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pytorch-fid's own InceptionV3 load the temp weights instead of downloading."""
    monkeypatch.setattr(pytorch_fid.inception, 'load_state_dict_from_url',
                        lambda *args, **kwargs: torch.load(weights_file, weights_only=True))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(pytorch_fid.inception, 'load_state_dict_from_url', refuse)


def _direct_fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID from the eigenvalues of s1 s2 (similar to a PSD matrix, so Tr sqrtm = sum sqrt(eig))."""
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    eig = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum())


def _loop_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3, written as the O(n^2) double sums."""
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


# ---------------------------------------------------------------- FID

def test_fid_matches_direct_eigenvalue_computation() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6))
    y = rng.normal(size=(30, 6)) @ rng.normal(size=(6, 6)) + 0.5
    (mu1, s1), (mu2, s2) = feature_statistics(x), feature_statistics(y)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_direct_fid(x, y), rel=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2),
                                                               rel=1e-12)


def test_fid_equal_covariances_is_mean_distance() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T + np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_fid_identical_sets_is_zero() -> None:
    feats = np.random.default_rng(3).normal(size=(50, 8))
    mu, sigma = feature_statistics(feats)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_feature_statistics_match_numpy() -> None:
    feats = np.random.default_rng(4).normal(size=(7, 3))
    mu, sigma = feature_statistics(feats)
    centred = feats - feats.mean(0)
    np.testing.assert_allclose(mu, feats.mean(0))
    np.testing.assert_allclose(sigma, centred.T @ centred / 6)


def test_fid_non_finite_sqrtm_uses_eps_offset() -> None:
    # sigma1 @ sigma2 = [[0, 1], [0, 0]] has no square root (scipy returns inf), forcing the eps retry.
    sigma1, sigma2 = np.diag([1.0, 0.0]), np.array([[0.0, 1.0], [0.0, 0.0]])
    assert not np.isfinite(linalg.sqrtm(sigma1 @ sigma2)).all()
    mu1, mu2 = np.zeros(2), np.array([1.0, 2.0])
    value = frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6)
    offset = 1e-6 * np.eye(2)
    expected = 5.0 + 1.0 - 2 * np.trace(linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset)).real)
    assert np.isfinite(value) and value == pytest.approx(expected, rel=1e-9)
    assert value == pytest.approx(calculate_frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-9)


# ---------------------------------------------------------------- KID

def test_kid_single_full_subset_matches_loop() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(9, 4)), rng.normal(size=(7, 4)) + 0.3
    x_only = x[:7]  # equal sizes: the one subset is each full set, just permuted
    mean, std = kernel_inception_distance(x_only, y, num_subsets=1, subset_size=100)
    assert mean == pytest.approx(_loop_mmd2(x_only, y), rel=1e-10)
    assert std == 0.0


def test_kid_subsets_of_full_sets_are_identical() -> None:
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    mean, std = kernel_inception_distance(x, y, num_subsets=4, subset_size=50)
    assert mean == pytest.approx(_loop_mmd2(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_kid_subset_size_adapts_to_smallest_set() -> None:
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(3, 3))
    mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=1000, seed=11)
    # Reproduce the subsets: 3 rows of x (without replacement), all of y (any order).
    picks = np.random.default_rng(11)
    expected = []
    for _ in range(3):
        rows = picks.choice(4, 3, replace=False)
        picks.choice(3, 3, replace=False)
        expected.append(_loop_mmd2(x[rows], y))
    assert mean == pytest.approx(np.mean(expected), rel=1e-10)
    assert std == pytest.approx(np.std(expected), rel=1e-8)


def test_kid_rejects_single_image() -> None:
    with pytest.raises(MetricsError, match='at least 2'):
        kernel_inception_distance(np.ones((1, 3)), np.ones((5, 3)))


def test_score_with_few_images() -> None:
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(4, 16)), rng.normal(size=(3, 16)) + 1.0
    scores = Evaluator(None).score(real, fake, kid_subsets=1)
    (mu1, s1), (mu2, s2) = feature_statistics(real), feature_statistics(fake)
    assert set(scores) == {'FID', 'KID', 'KID_std'}
    assert np.isfinite(scores['FID'])
    assert scores['FID'] == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-6)
    picks = np.random.default_rng(0)
    rows = picks.choice(4, 3, replace=False)
    assert scores['KID'] == pytest.approx(_loop_mmd2(real[rows], fake), rel=1e-10)


# ---------------------------------------------------------------- Inception network

def test_build_inception_matches_pytorch_fid(model: torch.nn.Module, pytorch_fid_loads: None) -> None:
    reference = pytorch_fid.inception.InceptionV3([3]).eval()
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    images01 = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        expected = reference(images01)[0].flatten(1)
    torch.testing.assert_close(unit_range_features(model, images01), expected, rtol=0, atol=0)
    # [-1, 1] input is the same image as [0, 1] input (up to rounding of the rescale).
    torch.testing.assert_close(inception_features(model, images01 * 2 - 1), expected, rtol=1e-5, atol=1e-5)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_build_inception_bad_files(tmp_path: Path) -> None:
    missing = tmp_path / 'nope.pth'
    with pytest.raises(MetricsError, match='nope.pth'):
        build_inception(str(missing))
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint')
    with pytest.raises(MetricsError, match='garbage.pth'):
        build_inception(str(garbage))
    partial = tmp_path / 'partial.pth'
    state = fid_inception_backbone().state_dict()
    state.pop('fc.weight')
    torch.save(state, partial)
    with pytest.raises(MetricsError, match='partial.pth'):
        build_inception(str(partial))


def test_build_inception_offline_without_weights(offline: None) -> None:
    with pytest.raises(MetricsError, match='--inception_weights FILE'):
        build_inception(None)


# ---------------------------------------------------------------- folders, cache, evaluator

def test_image_files_recursive_sorted_case_insensitive(tmp_path: Path) -> None:
    for name in ['b.PNG', 'a.jpg', 'sub/c.JpEg', 'notes.txt', 'd.webp']:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b'')
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)] == [
        'a.jpg', 'b.PNG', 'd.webp', 'sub/c.JpEg']


def test_folder_features_mixed_sizes_and_unreadable(tmp_path: Path, model: torch.nn.Module) -> None:
    paths = _write_pngs(tmp_path, 1, size=(32, 32), seed=1)
    paths += _write_pngs(tmp_path / 'sub', 1, size=(20, 28), seed=2)
    (tmp_path / 'broken.png').write_bytes(b'definitely not a png')
    with pytest.warns(UserWarning, match='broken.png'):
        feats = folder_features(tmp_path, model, batch_size=4)
    singles = [unit_range_features(model, to_tensor(Image.open(p).convert('RGB'))[None]) for p in paths]
    np.testing.assert_allclose(feats, torch.cat(singles).double().numpy(), rtol=1e-5, atol=1e-6)

    with pytest.warns(UserWarning, match='broken.png'):
        resized = folder_features(tmp_path, model, batch_size=4, img_size=16)
    last = to_tensor(Image.open(paths[1]).convert('RGB').resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(resized[1], unit_range_features(model, last[None])[0].numpy(),
                               rtol=1e-5, atol=1e-6)


def test_feature_cache_hits_and_atomic_files(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / 'cache')
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.arange(6.0).reshape(2, 3)

    first = cache.get_or_compute({'folder': 'x', 'img_size': 8}, compute)
    second = cache.get_or_compute({'img_size': 8, 'folder': 'x'}, compute)
    np.testing.assert_array_equal(first, second)
    assert len(calls) == 1
    cache.get_or_compute({'folder': 'x', 'img_size': 16}, compute)
    assert len(calls) == 2
    assert sorted(p.suffix for p in (tmp_path / 'cache').iterdir()) == ['.npz', '.npz']


def test_evaluator_real_features_cached_until_folder_changes(tmp_path: Path, model: torch.nn.Module,
                                                            weights_file: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / 'real'
    _write_pngs(folder, 2, seed=3)
    evaluator = Evaluator(str(weights_file), 'cpu', batch_size=8, cache_dir=str(tmp_path / 'cache'))
    evaluator._model = model  # reuse the module's network instead of loading it again
    calls = []

    def counting(*args, **kwargs) -> np.ndarray:
        calls.append(1)
        return folder_features(*args, **kwargs)

    monkeypatch.setattr(evaluator_module, 'folder_features', counting)
    first = evaluator.real_features(folder, img_size=16)
    np.testing.assert_array_equal(evaluator.real_features(folder, img_size=16), first)
    assert len(calls) == 1
    _write_pngs(folder / 'more', 1, seed=4)
    grown = evaluator.real_features(folder, img_size=16)
    assert len(calls) == 2 and grown.shape == (3, 2048)
    np.testing.assert_allclose(grown[:2], first, rtol=1e-5, atol=1e-6)


def test_evaluator_fake_features_splits_batches(model: torch.nn.Module, weights_file: Path) -> None:
    evaluator = Evaluator(str(weights_file), batch_size=2)
    evaluator._model = model
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    feats = evaluator.fake_features([images, images[0]])
    expected = inception_features(model, torch.cat([images, images[:1]])).double().numpy()
    assert feats.shape == (4, 2048) and feats.dtype == np.float64
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- CLI

def _parse_cli(out: str) -> tuple[float, float, float]:
    fid_line, kid_line = out.strip().splitlines()
    assert fid_line.startswith('FID: ') and kid_line.startswith('KID: ')
    kid_mean, kid_std = kid_line[len('KID: '):].split(' ± ')
    return float(fid_line[len('FID: '):]), float(kid_mean), float(kid_std)


def _range_sqrtm(a: np.ndarray, disp: bool = True):
    """Fast stand-in for scipy's sqrtm of a low-rank s1 @ s2 (a handful of images, 2048 dims).

    FID reads only the trace (and the diagonal's imaginary part) of sqrtm(s1 s2), i.e. the sum of the
    square roots of its eigenvalues, which all live on the range of s1 s2. Finding them there takes
    milliseconds instead of ~15 s per call on 2 cores. ``disp=False`` mimics pytorch-fid's call.
    """
    probes = np.random.default_rng(0).normal(size=(a.shape[0], 32))
    basis, _ = np.linalg.qr(a @ probes)
    eig = np.linalg.eigvals(basis.T @ a @ basis).real.clip(min=0)
    root = np.zeros_like(a)
    root[:len(eig), :len(eig)] = np.diag(np.sqrt(eig))
    return (root, 0.0) if disp is False else root


def test_range_sqrtm_has_the_trace_of_sqrtm() -> None:
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(5, 60)), rng.normal(size=(4, 60))
    product = np.cov(x, rowvar=False) @ np.cov(y, rowvar=False)
    exact = np.trace(linalg.sqrtm(product).real)
    assert np.trace(_range_sqrtm(product)) == pytest.approx(exact, rel=1e-6)


def test_cli_matches_pytorch_fid(tmp_path: Path, weights_file: Path, pytorch_fid_loads: None,
                                 capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Both sides share scipy.linalg.sqrtm; the stand-in keeps this end-to-end check fast.
    monkeypatch.setattr(linalg, 'sqrtm', _range_sqrtm)
    dir1, dir2 = tmp_path / 'one', tmp_path / 'two'
    _write_pngs(dir1, 6, seed=10)
    _write_pngs(dir2, 5, seed=20, shift=40)
    assert main([str(dir1), str(dir2), '--weights', str(weights_file), '--kid_subsets', '3']) == 0
    fid, kid, kid_std = _parse_cli(capsys.readouterr().out)

    activations = []

    def recording(*args, **kwargs) -> np.ndarray:
        activations.append(get_activations(*args, **kwargs))
        return activations[-1]

    monkeypatch.setattr(fid_score, 'get_activations', recording)
    expected = fid_score.calculate_fid_given_paths([str(dir1), str(dir2)], 50, 'cpu', 2048, num_workers=0)
    assert fid > 1.0  # a real difference, so the relative comparison below means something
    assert fid == pytest.approx(expected, rel=1e-4)
    expected_kid = kernel_inception_distance(*activations, num_subsets=3)  # from pytorch-fid's features
    assert (kid, kid_std) == pytest.approx(expected_kid, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize('case', ['missing_dir', 'empty_dir', 'missing_weights', 'offline'])
def test_cli_errors_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           offline: None) -> None:
    good = tmp_path / 'good'
    _write_pngs(good, 2)
    (tmp_path / 'empty').mkdir()
    argv = {
        'missing_dir': [str(good), str(tmp_path / 'absent')],
        'empty_dir': [str(good), str(tmp_path / 'empty')],
        'missing_weights': [str(good), str(good), '--weights', str(tmp_path / 'w.pth')],
        'offline': [str(good), str(good)],
    }[case]
    assert main(argv + ['--device', 'cpu']) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ')
    hint = {'missing_dir': 'absent', 'empty_dir': 'no images', 'missing_weights': 'w.pth',
            'offline': '--weights FILE'}[case]
    assert hint in lines[0]
