"""Tests for faceseg: BiSeNet checkpoint layout, mask rules, morphology, end-to-end segmenter."""

import cv2
import numpy as np
import pytest
import torch
import torchvision

from faceseg import BiSeNet, FaceSegmenter, FaceWeightsError, SegMasks, load_bisenet, masks_from_probs
from faceseg.segmenter import close_then_erode

# Transcribed from zllrunning/face-parsing.PyTorch model.py / resnet.py (BiSeNet(n_classes=19)).
REFERENCE_SHAPES = {
    'cp.resnet.conv1.weight': (64, 3, 7, 7),
    'cp.resnet.bn1.running_var': (64,),
    'cp.resnet.layer1.1.conv2.weight': (64, 64, 3, 3),
    'cp.resnet.layer2.0.conv1.weight': (128, 64, 3, 3),
    'cp.resnet.layer2.0.downsample.0.weight': (128, 64, 1, 1),
    'cp.resnet.layer2.0.downsample.1.running_mean': (128,),
    'cp.resnet.layer3.0.downsample.0.weight': (256, 128, 1, 1),
    'cp.resnet.layer4.0.downsample.1.weight': (512,),
    'cp.resnet.layer4.1.bn2.num_batches_tracked': (),
    'cp.arm16.conv.conv.weight': (128, 256, 3, 3),
    'cp.arm16.conv.bn.bias': (128,),
    'cp.arm16.conv_atten.weight': (128, 128, 1, 1),
    'cp.arm16.bn_atten.running_mean': (128,),
    'cp.arm32.conv.conv.weight': (128, 512, 3, 3),
    'cp.arm32.bn_atten.weight': (128,),
    'cp.conv_head32.conv.weight': (128, 128, 3, 3),
    'cp.conv_head16.bn.running_var': (128,),
    'cp.conv_avg.conv.weight': (128, 512, 1, 1),
    'cp.conv_avg.bn.num_batches_tracked': (),
    'ffm.convblk.conv.weight': (256, 256, 1, 1),
    'ffm.convblk.bn.weight': (256,),
    'ffm.conv1.weight': (64, 256, 1, 1),
    'ffm.conv2.weight': (256, 64, 1, 1),
    'conv_out.conv.conv.weight': (256, 256, 3, 3),
    'conv_out.conv.bn.running_mean': (256,),
    'conv_out.conv_out.weight': (19, 256, 1, 1),
    'conv_out16.conv.conv.weight': (64, 128, 3, 3),
    'conv_out16.conv_out.weight': (19, 64, 1, 1),
    'conv_out32.conv.bn.bias': (64,),
    'conv_out32.conv_out.weight': (19, 64, 1, 1),
}
# Parameter count from the reference architecture, worked out by hand:
#   ResNet-18 without fc: 11_689_512 - 513_000 = 11_176_512
#   context path heads: arm16 311_808 + arm32 606_720 + 2 × head 147_712 + conv_avg 65_792
#   ffm 98_816; conv_out 595_200; conv_out16 = conv_out32 = 75_072
REFERENCE_PARAMS = 11_176_512 + 311_808 + 606_720 + 2 * 147_712 + 65_792 + 98_816 + 595_200 + 2 * 75_072
# 36 bias-free convolutions and 31 batch norms (weight, bias + 3 buffers each).
REFERENCE_KEYS = 36 + 31 * 5

ELLIPSE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
SKIN, GLASSES, MOUTH, CLOTH, HAIR = 1, 6, 11, 16, 17


def cv2_close_erode(mask: np.ndarray) -> np.ndarray:
    """EN's reference morphology on one H×W float32 mask."""
    closed = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, ELLIPSE)
    return cv2.erode(closed, ELLIPSE, iterations=1)


def one_hot(labels: np.ndarray) -> torch.Tensor:
    """H×W integer label map -> 1×19×H×W one-hot probabilities."""
    return torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 19).permute(2, 0, 1)[None].float()


@pytest.fixture(scope='module')
def net() -> BiSeNet:
    torch.manual_seed(0)
    return BiSeNet(19).eval()


# --- BiSeNet ------------------------------------------------------------------------------------


def test_bisenet_outputs_at_input_resolution(net):
    with torch.no_grad():
        outputs = net(torch.randn(1, 3, 512, 512))
    assert [tuple(o.shape) for o in outputs] == [(1, 19, 512, 512)] * 3


def test_bisenet_state_dict_matches_reference_layout(net):
    state = net.state_dict()
    for key, shape in REFERENCE_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert len(state) == REFERENCE_KEYS == 191
    assert sum(p.numel() for p in net.parameters()) == REFERENCE_PARAMS == 13_300_416
    # The original backbone loads torchvision's resnet18 weights minus fc, so names must agree.
    tv = {k: tuple(v.shape) for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
          if not k.startswith('fc.')}
    prefix = 'cp.resnet.'
    ours = {k.removeprefix(prefix): tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
    assert ours == tv


def test_load_bisenet_strict_roundtrip(net, tmp_path):
    path = tmp_path / '79999_iter.pth'
    torch.save(net.state_dict(), path)
    loaded = load_bisenet(path)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_bisenet_missing_file(tmp_path):
    with pytest.raises(FaceWeightsError, match='--faceseg_weights') as info:
        load_bisenet(tmp_path / 'nope.pth')
    assert 'not found' in str(info.value) and '\n' not in str(info.value)


def test_load_bisenet_bad_files(net, tmp_path):
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint')
    with pytest.raises(FaceWeightsError, match='--faceseg_weights'):
        load_bisenet(garbage)
    partial = tmp_path / 'partial.pth'
    state = net.state_dict()
    del state['conv_out.conv_out.weight']
    torch.save(state, partial)
    with pytest.raises(FaceWeightsError, match='1 missing keys') as info:
        load_bisenet(partial)
    assert '\n' not in str(info.value)


# --- masks_from_probs ---------------------------------------------------------------------------


def parsing_map() -> np.ndarray:
    """16×16 labels: background, cloth, hair, skin with a mouth and glasses."""
    labels = np.zeros((16, 16), np.int64)
    labels[12:, :] = CLOTH
    labels[1:4, 3:13] = HAIR
    labels[4:12, 3:13] = SKIN
    labels[5:7, 4:12] = GLASSES
    labels[9:11, 6:10] = MOUTH
    return labels


def test_face_mask_is_class_set_indicator():
    labels = parsing_map()
    masks = masks_from_probs(one_hot(labels))
    expected = np.isin(labels, [*range(1, 14), 17]).astype(np.float32)
    assert isinstance(masks, SegMasks)
    assert masks.face.shape == masks.eroded.shape == (1, 1, 16, 16)
    np.testing.assert_array_equal(masks.face[0, 0].numpy(), expected)
    np.testing.assert_array_equal(masks.eroded[0, 0].numpy(), cv2_close_erode(expected))
    assert masks.eroded.sum() < masks.face.sum()


def test_soft_and_hard_edge_rules():
    face_prob = torch.tensor([0.05, 0.25, 0.35, 0.5, 0.65, 0.75, 0.95])
    probs = torch.zeros(1, 19, 1, 7)
    probs[0, SKIN, 0] = face_prob
    probs[0, 0, 0] = 1 - face_prob
    soft = masks_from_probs(probs).face.flatten()
    hard = masks_from_probs(probs, hard_edge=True).face.flatten()
    torch.testing.assert_close(soft, torch.tensor([0, 0, 0.35, 0.5, 0.65, 1, 1]))
    torch.testing.assert_close(hard, torch.tensor([0.0, 0, 0, 1, 1, 1, 1]))


def test_fix_glass_mouth_removes_mouth_and_thin_glasses():
    labels = np.full((24, 24), SKIN, np.int64)
    labels[:2], labels[-2:] = 0, 0
    labels[14:17, 8:16] = MOUTH
    labels[4:6, 2:22] = GLASSES  # 2-pixel frame bar: vanishes under erosion
    labels[7:13, 2:8] = GLASSES  # 6×6 lens block: its eroded core stays foreground
    probs = one_hot(labels)
    plain = masks_from_probs(probs)
    fixed = masks_from_probs(probs, fix_glass_mouth=True)

    parts = np.isin(labels, [1, 2, 3, 4, 5, 7, 8, 9, 10, 12, 13, 17]).astype(np.float32)
    glasses_kept = cv2_close_erode((labels == GLASSES).astype(np.float32))
    expected = plain.eroded[0, 0].numpy() * np.clip(parts + glasses_kept, 0, 1)
    np.testing.assert_array_equal(fixed.eroded[0, 0].numpy(), expected)
    torch.testing.assert_close(fixed.face, plain.face)
    assert fixed.eroded[0, 0, 14:17, 8:16].sum() == 0  # mouth
    assert fixed.eroded[0, 0, 4:6, 2:22].sum() == 0  # frame bar
    assert fixed.eroded[0, 0, 9:11, 4:6].sum() == 4  # core of the lens block
    assert plain.eroded[0, 0, 14:17, 8:16].sum() == 24


def test_erosion_shrinks_square_like_opencv():
    square = np.zeros((16, 16), np.float32)
    square[4:12, 4:12] = 1
    eroded = close_then_erode(torch.from_numpy(square)[None, None])[0, 0].numpy()
    np.testing.assert_array_equal(eroded, cv2_close_erode(square))
    assert eroded.sum() == 16 and eroded[6:10, 6:10].all()  # 8×8 loses 2 pixels per side


def test_morphology_matches_opencv_on_random_masks():
    rng = np.random.default_rng(0)
    binary = (rng.random((3, 20, 24)) > 0.4).astype(np.float32)
    soft = rng.random((3, 20, 24)).astype(np.float32)
    for batch in (binary, soft):  # incl. borders and grey values
        ours = close_then_erode(torch.from_numpy(batch)[:, None])[:, 0].numpy()
        expected = np.stack([cv2_close_erode(m) for m in batch])
        np.testing.assert_allclose(ours, expected, atol=1e-6)


# --- FaceSegmenter ------------------------------------------------------------------------------


def test_face_segmenter_end_to_end(net):
    segmenter = FaceSegmenter(net)
    segmenter.train()
    assert not segmenter.net.training and segmenter.training
    images = (torch.rand(1, 3, 64, 64) * 2 - 1).requires_grad_(True)
    masks = segmenter(images)
    probs = segmenter.probs(images)
    assert masks.face.shape == masks.eroded.shape == (1, 1, 64, 64)
    for mask in masks:
        assert not mask.requires_grad
        assert 0 <= mask.min() and mask.max() <= 1
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 64, 64))
    torch.testing.assert_close(masks.face, masks_from_probs(probs).face)
    torch.testing.assert_close(masks.eroded, close_then_erode(masks.face))
