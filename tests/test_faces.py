"""Tests for the frozen FaceNet identity loss, face alignment and scripts/prepare_faces.py."""

from __future__ import annotations

import math
import subprocess
import sys
import urllib.error
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from facenet_pytorch import InceptionResnetV1
from facenet_pytorch.models import inception_resnet_v1
from PIL import Image
from torch import nn

from faceseg.align import (
    EYE_DISTANCE,
    EYE_Y,
    FaceAligner,
    FaceDetector,
    align_face,
    alignment_matrix,
    feather_mask,
    paste_back,
)
from faceseg.errors import FaceWeightsError
from faceseg.facenet import FaceIdentity, load_facenet
from scripts import prepare_faces

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- FaceNet loading

def _random_facenet(with_logits: bool) -> InceptionResnetV1:
    """A random InceptionResnetV1 whose batch-norm statistics are not the defaults either."""
    torch.manual_seed(0)
    net = InceptionResnetV1(classify=with_logits, num_classes=7 if with_logits else None)
    for name, buffer in net.named_buffers():
        if name.endswith('running_mean'):
            buffer.copy_(0.1 * torch.randn_like(buffer))
        elif name.endswith('running_var'):
            buffer.copy_(torch.rand_like(buffer) + 0.5)
    net.classify = False  # the reference output is the embedding
    return net.eval()


@pytest.fixture(scope='module')
def saved_facenet(tmp_path_factory) -> tuple[InceptionResnetV1, Path, Path]:
    """(reference net, state dict with logits keys, state dict without) on disk."""
    folder = tmp_path_factory.mktemp('facenet')
    net = _random_facenet(with_logits=True)
    with_logits, without_logits = folder / 'with_logits.pt', folder / 'plain.pth'
    torch.save(net.state_dict(), with_logits)
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith('logits.')}, without_logits)
    assert any(k.startswith('logits.') for k in torch.load(with_logits))
    return net, with_logits, without_logits


@pytest.fixture(scope='module')
def identity(saved_facenet) -> FaceIdentity:
    return FaceIdentity.load(weights=saved_facenet[2])


@pytest.fixture(scope='module')
def faces_batch() -> torch.Tensor:
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_load_facenet_from_file_matches_saved_model(saved_facenet):
    reference, with_logits, without_logits = saved_facenet
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(x)
        for path in (with_logits, without_logits):
            net = load_facenet(weights=str(path))
            assert not net.training and not hasattr(net, 'logits')
            assert all(not p.requires_grad for p in net.parameters())
            torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_load_facenet_from_checkpoint_dir(saved_facenet, tmp_path):
    reference, with_logits, _ = saved_facenet
    (tmp_path / 'readme.txt').write_text('not weights')
    (tmp_path / 'model.pt').write_bytes(with_logits.read_bytes())
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(load_facenet(checkpoint_dir=tmp_path)(x), reference(x), rtol=0, atol=0)
    (tmp_path / 'other.pth').write_bytes(with_logits.read_bytes())
    with pytest.raises(FaceWeightsError, match='--facenet_checkpoint_dir.*found model.pt, other.pth'):
        load_facenet(checkpoint_dir=tmp_path)
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(FaceWeightsError, match='--facenet_checkpoint_dir.*found none'):
        load_facenet(checkpoint_dir=empty)


def test_load_facenet_errors_name_the_flag(tmp_path):
    with pytest.raises(FaceWeightsError, match='--facenet_weights'):
        load_facenet()
    with pytest.raises(FaceWeightsError, match="--facenet_weights: file not found: '.*missing.pt'"):
        load_facenet(weights=tmp_path / 'missing.pt')
    wrong = tmp_path / 'wrong.pt'
    torch.save({'conv.weight': torch.zeros(3)}, wrong)
    with pytest.raises(FaceWeightsError, match='--facenet_weights.*not an InceptionResnetV1 state dict'):
        load_facenet(weights=wrong)
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'no pickle here')
    with pytest.raises(FaceWeightsError, match='--facenet_weights: cannot read'):
        load_facenet(weights=garbage)
    with pytest.raises(FaceWeightsError, match='only one'):
        load_facenet(weights=wrong, pretrained='vggface2')
    with pytest.raises(FaceWeightsError, match='unknown'):
        load_facenet(pretrained='imagenet')


def test_pretrained_download_failure_is_a_weights_error(monkeypatch, tmp_path):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError('network is unreachable')

    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setattr(inception_resnet_v1, 'download_url_to_file', offline)
    with pytest.raises(FaceWeightsError, match='vggface2.*unreachable.*--facenet_weights FILE') as info:
        load_facenet(pretrained='vggface2')
    assert '\n' not in str(info.value)


# ----------------------------------------------------------------------------- FaceIdentity

def test_embed_resizes_and_standardises(identity, faces_batch):
    with torch.no_grad():
        embedding = identity.embed(faces_batch)
        resized = F.interpolate(faces_batch, size=(160, 160), mode='bilinear', align_corners=False)
        pixels = (resized + 1) / 2 * 255  # what fixed_image_standardization expects
        expected = identity.net((pixels - 127.5) / 128)
    assert embedding.shape == (3, 512)
    torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(3))


def test_distance_zero_for_identical_positive_for_different(identity, faces_batch):
    with torch.no_grad():
        same = identity(faces_batch, faces_batch.clone())
        other = identity(faces_batch, faces_batch.flip(0))
        e = identity.embed(faces_batch)
    assert same.shape == (3,)
    torch.testing.assert_close(same, torch.zeros(3), rtol=0, atol=1e-10)
    # Sample 1 is paired with itself under flip(0); 0 and 2 swap.
    expected = ((e - e.flip(0)) ** 2).sum(dim=1)
    torch.testing.assert_close(other, expected, rtol=1e-5, atol=1e-6)
    # A random FaceNet maps all inputs close together, so "positive" is small but far above zero.
    assert other[0] > 1e-8 and other[2] > 1e-8 and other[1] < 1e-12
    assert float(other.max()) <= 4.0


def test_gradient_reaches_generator_not_facenet(identity, faces_batch):
    torch.manual_seed(4)
    generator = nn.Conv2d(3, 3, 3, padding=1)
    identity.train()  # the wrapper may be put in train mode with the trainer ...
    assert identity.training and not any(m.training for m in identity.net.modules())  # ... FaceNet not
    stats = identity.net.last_bn.running_mean.clone()
    distance = identity(faces_batch, torch.tanh(generator(faces_batch)))
    distance.sum().backward()
    assert distance.shape == (3,) and bool((distance > 0).all())
    assert generator.weight.grad is not None and float(generator.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in identity.parameters())
    torch.testing.assert_close(identity.net.last_bn.running_mean, stats, rtol=0, atol=0)


def test_gradient_reaches_source_when_it_requires_grad(identity, faces_batch):
    source = faces_batch.clone().requires_grad_(True)
    identity(source, faces_batch.flip(0)).sum().backward()
    assert source.grad is not None and float(source.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------- alignment

FRONTAL = np.array([[100.0, 120.0], [160.0, 120.0], [130.0, 150.0], [108.0, 178.0], [152.0, 178.0]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _rotation(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


@pytest.mark.parametrize('margin', [0.0, 0.4, 1.0])
@pytest.mark.parametrize('landmarks', [FRONTAL, FRONTAL @ _rotation(-17).T * 0.7 + (40, -9)])
def test_eyes_map_to_documented_points(landmarks, margin):
    out = 256
    matrix = alignment_matrix(landmarks, out, margin)
    distance = out * EYE_DISTANCE / (1 + 2 * margin)
    eye_y = out * (margin + EYE_Y) / (1 + 2 * margin)
    expected = np.array([[out / 2 - distance / 2, eye_y], [out / 2 + distance / 2, eye_y]])
    np.testing.assert_allclose(_apply(matrix, landmarks[:2]), expected, rtol=0, atol=1e-6)


def test_margin_shrinks_the_face():
    distances = [np.ptp(_apply(alignment_matrix(FRONTAL, 256, m), FRONTAL[:2])[:, 0]) for m in (0, 0.4, 1)]
    np.testing.assert_allclose(distances, [115.2, 64.0, 38.4], rtol=1e-9)


def test_rotated_face_gets_inverse_rotation():
    centre = FRONTAL.mean(axis=0)
    rotated = (FRONTAL - centre) @ _rotation(30).T + centre
    base, matrix = alignment_matrix(FRONTAL, 128), alignment_matrix(rotated, 128)
    scale = math.sqrt(np.linalg.det(matrix[:, :2]))
    assert scale == pytest.approx(math.sqrt(np.linalg.det(base[:, :2])), rel=1e-12)
    np.testing.assert_allclose(matrix[:, :2] / scale, _rotation(-30), atol=1e-12)
    # The whole face lands where the upright face lands.
    np.testing.assert_allclose(_apply(matrix, rotated), _apply(base, FRONTAL), atol=1e-6)


def _smooth_frame(height: int = 240, width: int = 320) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [128 + 100 * np.sin(x / 37.0) * np.cos(y / 29.0), 40 + 0.5 * x + 0.2 * y,
                128 + 90 * np.cos((x + y) / 45.0)]
    return np.clip(np.stack(channels, axis=2), 0, 255).astype(np.uint8)


@pytest.mark.parametrize('out_size', [128, 24])  # upsampling, and shrinking with supersampling
def test_eye_markers_land_on_targets(out_size):
    frame = np.zeros((240, 320, 3), np.uint8)
    landmarks = (FRONTAL - FRONTAL.mean(0)) @ _rotation(20).T + FRONTAL.mean(0)
    for eye in landmarks[:2]:
        cv2.circle(frame, tuple(int(round(v)) for v in eye * 16), 5 * 16, (255, 255, 255), -1,
                   lineType=cv2.LINE_AA, shift=4)
    crop, matrix = align_face(frame, landmarks, out_size, 0.4)
    assert crop.shape == (out_size, out_size, 3) and crop.dtype == np.uint8
    grey = crop[:, :, 0].astype(np.float64)
    targets = _apply(matrix, landmarks[:2])
    for target in targets:
        ys, xs = np.mgrid[0:out_size, 0:out_size]
        near = (np.hypot(xs - target[0], ys - target[1]) < out_size * 0.08) * grey
        centroid = np.array([(near * xs).sum(), (near * ys).sum()]) / near.sum()
        np.testing.assert_allclose(centroid, target, atol=0.05 * out_size ** 0.5)


def test_align_then_paste_back_reproduces_the_frame():
    frame = _smooth_frame()
    landmarks = (FRONTAL - FRONTAL.mean(0)) @ _rotation(15).T + FRONTAL.mean(0)
    crop, matrix = align_face(frame, landmarks, 128, 0.4)
    result = paste_back(frame, crop, matrix, feather=0.1)
    assert result.shape == frame.shape and result.dtype == np.uint8
    ys, xs = np.mgrid[0:frame.shape[0], 0:frame.shape[1]]
    in_crop = _apply(matrix, np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64))
    in_crop = in_crop.reshape(frame.shape[0], frame.shape[1], 2)
    inside = ((in_crop > 0) & (in_crop < 127)).all(axis=2)
    far = ((in_crop < -3) | (in_crop > 131)).any(axis=2)
    assert inside.sum() > 5000 and far.sum() > 10000
    difference = np.abs(result.astype(int) - frame.astype(int))
    assert difference[inside].max() <= 3
    assert np.array_equal(result[far], frame[far])


def test_paste_back_blends_softly():
    frame = np.zeros((200, 200, 3), np.uint8)
    landmarks = FRONTAL - (30, 40)
    _, matrix = align_face(frame, landmarks, 64, 0.4)
    result = paste_back(frame, np.full((64, 64, 3), 200, np.uint8), matrix, feather=0.2)[:, :, 0]
    centre = np.rint(cv2.invertAffineTransform(matrix) @ (32, 32, 1)).astype(int)
    assert result[centre[1], centre[0]] == 200
    row = result[centre[1]].astype(int)
    assert ((row > 10) & (row < 190)).sum() >= 8  # a ramp, not a seam
    assert np.abs(np.diff(row)).max() <= 40
    mask = feather_mask(64, 0.2)
    assert mask[32, 32] == 1 and mask[0, 0] < 0.01 and mask.min() >= 0
    np.testing.assert_array_equal(feather_mask(8, 0.0), np.ones((8, 8), np.float32))


# ----------------------------------------------------------------------------- detection

@pytest.fixture(scope='module')
def detector() -> FaceDetector:
    return FaceDetector(min_face_size=20)


def test_detector_finds_no_face_in_noise_or_tiny_images(detector):
    rng = np.random.default_rng(5)
    assert detector.detect(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)) == []
    assert detector.detect(np.full((80, 80), 128, np.uint8)) == []  # grey image
    assert detector.detect(np.zeros((10, 300, 3), np.uint8)) == []  # below min_face_size


def test_detections_are_sorted_and_cropped():
    # Near-zero thresholds make MTCNN report blobs in smooth noise: enough to test the plumbing.
    noise = np.random.default_rng(0).integers(0, 256, (160, 200, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(noise, (0, 0), 3)
    aligner = FaceAligner(min_face_size=20, thresholds=(0.05, 0.05, 0.05))
    faces = aligner.detector.detect(image)
    assert len(faces) >= 2
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    assert all(f.landmarks.shape == (5, 2) and 0 < f.prob <= 1 for f in faces)
    assert len(aligner.crops(image, 32, all_faces=False)) == 1
    crops = aligner.crops(image, 32, all_faces=True)
    assert len(crops) == len(faces) and crops[0][0].shape == (32, 32, 3)
    np.testing.assert_allclose(crops[0][1], alignment_matrix(faces[0].landmarks, 32, 0.4))
    identity = aligner.apply(image, lambda crop: crop, 32)
    assert np.abs(identity.astype(int) - image.astype(int)).max() <= 40
    assert np.array_equal(FaceAligner(detector=FaceDetector(min_face_size=20)).apply(noise, np.flipud, 32),
                          noise)


# ----------------------------------------------------------------------------- prepare_faces

def _photo_folder(root: Path) -> Path:
    photos = root / 'photos'
    (photos / 'sub').mkdir(parents=True)
    rng = np.random.default_rng(6)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photos / 'noise.png')
    Image.fromarray(np.full((50, 80, 3), (200, 120, 90), np.uint8)).save(photos / 'flat.jpg')
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(photos / 'sub' / 'grey.PNG')
    (photos / 'sub' / 'broken.jpg').write_bytes(b'this is not a jpeg')
    (photos / 'notes.txt').write_text('ignored')
    return photos


def test_prepare_faces_reports_images_without_faces(tmp_path, capsys):
    photos, output = _photo_folder(tmp_path), tmp_path / 'out' / 'trainA'
    assert prepare_faces.main(['--input', str(photos), '--output', str(output), '--size', '64']) == 0
    captured = capsys.readouterr()
    assert '4 images, 0 faces written, 3 without a face, 1 unreadable' in captured.out
    assert 'sub/broken.jpg' in captured.err.replace('\\', '/')
    assert (output / 'no_face.txt').read_text().splitlines() == ['flat.jpg', 'noise.png', 'sub/grey.PNG']
    assert sorted(p.name for p in output.iterdir()) == ['no_face.txt']


class _FakeAligner:
    """Stands in for MTCNN: the number of 'faces' is the image width // 20."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def crops(self, image, out_size, margin, all_faces):
        n = image.shape[1] // 20 if all_faces else min(1, image.shape[1] // 20)
        return [(np.full((out_size, out_size, 3), k, np.uint8), np.eye(2, 3)) for k in range(n)]


def test_prepare_faces_names_outputs(tmp_path, monkeypatch, capsys):
    photos = tmp_path / 'photos'
    (photos / 'sub').mkdir(parents=True)
    for name, width in [('a.jpg', 45), ('a.png', 25), ('sub/a.jpeg', 30), ('none.png', 10)]:
        Image.fromarray(np.zeros((30, width, 3), np.uint8)).save(photos / name)
    monkeypatch.setattr(prepare_faces, 'FaceAligner', _FakeAligner)
    output = tmp_path / 'single'
    assert prepare_faces.main(['--input', str(photos), '--output', str(output), '--size', '16']) == 0
    assert sorted(p.name for p in output.glob('*.png')) == ['a.png', 'a_png.png', 'sub_a.png']
    assert np.asarray(Image.open(output / 'a.png')).shape == (16, 16, 3)
    assert (output / 'no_face.txt').read_text() == 'none.png\n'
    output = tmp_path / 'all'
    assert prepare_faces.main(['--input', str(photos), '--output', str(output), '--all_faces']) == 0
    assert sorted(p.name for p in output.glob('*.png')) == ['a_0.png', 'a_1.png', 'a_png_0.png', 'sub_a_0.png']
    assert np.asarray(Image.open(output / 'a_1.png')).max() == 1
    assert '4 images, 4 faces written, 1 without a face, 0 unreadable' in capsys.readouterr().out


def test_prepare_faces_missing_input(tmp_path, capsys):
    code = prepare_faces.main(['--input', str(tmp_path / 'nope'), '--output', str(tmp_path / 'out')])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '--input' in err and 'nope' in err
    assert not (tmp_path / 'out').exists()


def test_prepare_faces_runs_as_a_script(tmp_path):
    result = subprocess.run([sys.executable, 'scripts/prepare_faces.py', '--input', str(tmp_path / 'nope'),
                             '--output', str(tmp_path / 'out')], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and 'error: --input folder not found' in result.stderr
