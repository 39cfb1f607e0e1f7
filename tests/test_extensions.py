"""Training extensions: EMA, loss/schedule/data/architecture options, and the video phase."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_flags, train_stream
from torch import nn

import checkpoints
import images as image_arrays
import losses
import main
import utils
from ugatit import UGATIT


def _trainer(tiny_dataset: Path, tmp_path: Path, *extra: str) -> UGATIT:
    torch.manual_seed(0)
    return UGATIT(main.parse_args(tiny_flags(tiny_dataset, tmp_path / 'out', '--iteration', '10', *extra)))


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for k in 'AB'}


def test_ema_update_formula_by_hand():
    net = nn.Linear(3, 2)
    ema = utils.EMA(net, beta=0.9, start_step=2)
    before = ema.model.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=2)                      # before the start: a plain copy
    torch.testing.assert_close(ema.model.weight, net.weight)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=3)
    expected = 0.9 * (before + 1.0) + 0.1 * (before + 2.0)
    torch.testing.assert_close(ema.model.weight, expected)
    assert not ema.model.weight.requires_grad


def test_split_adversarial_weights_scale_their_direction_only(tiny_dataset, tmp_path):
    base = _trainer(tiny_dataset, tmp_path).train_step(_batch(), 1)
    fwd = _trainer(tiny_dataset, tmp_path, '--forward_adv_weight', '2').train_step(_batch(), 1)
    torch.testing.assert_close(fwd['G/adv_A2B'], 2 * base['G/adv_A2B'], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fwd['D/adv_B'], 2 * base['D/adv_B'], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fwd['D/adv_A'], base['D/adv_A'], rtol=1e-5, atol=1e-6)
    bwd = _trainer(tiny_dataset, tmp_path, '--backward_adv_weight', '0.5').train_step(_batch(), 1)
    torch.testing.assert_close(bwd['D/adv_A'], 0.5 * base['D/adv_A'], rtol=1e-5, atol=1e-6)


def test_cam_d_weight_scales_and_drops_cam_terms():
    from networks import DiscriminatorOutput
    out = [DiscriminatorOutput(torch.full((1, 1, 2, 2), 0.5), torch.tensor([[2.0, 0.0]]), torch.zeros(1))]
    assert losses.GANLoss(1.0).d_real(out).item() == pytest.approx(0.25 + (1 + 1) / 2)
    assert losses.GANLoss(3.0).d_real(out).item() == pytest.approx(0.25 + 3 * (1 + 1) / 2)
    assert losses.GANLoss(-1.0).d_real(out).item() == pytest.approx(0.25)


def test_lsgan_mask_zeroes_background_patches():
    pred = torch.tensor([[[[0.0, 2.0], [0.0, 2.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert losses.lsgan(pred, 1.0).item() == pytest.approx(1.0)
    assert losses.lsgan(pred, 1.0, mask).item() == pytest.approx(0.5)   # masked cells count as on target


def test_total_variation_is_real_tv():
    image = torch.zeros(1, 1, 3, 3)
    image[..., 1, 1] = 1.0
    # |dx| sum = 2 over 6 pairs, |dy| sum = 2 over 6 pairs
    assert losses.total_variation(image).item() == pytest.approx(2 / 6 + 2 / 6)
    assert losses.total_variation(torch.ones(1, 3, 4, 4)).item() == 0.0


def test_tv_weight_adds_the_term(tiny_dataset, tmp_path):
    logs = _trainer(tiny_dataset, tmp_path, '--tv_weight', '3').train_step(_batch(), 1)
    assert 'G/tv_A2B' in logs and logs['G/tv_A2B'] > 0
    assert 'G/tv_A2B' not in _trainer(tiny_dataset, tmp_path).train_step(_batch(), 1)


def test_cam_d_weight_flag_changes_d_loss(tiny_dataset, tmp_path):
    base = _trainer(tiny_dataset, tmp_path).train_step(_batch(), 1)
    off = _trainer(tiny_dataset, tmp_path, '--cam_D_weight', '0').train_step(_batch(), 1)
    assert off['D/adv_A'] < base['D/adv_A']


def test_has_blur_generates_images_once_and_feeds_d(tiny_dataset, tmp_path):
    trainer = _trainer(tiny_dataset, tmp_path, '--has_blur', 'True')
    batch = next(train_stream(trainer))
    assert {'blur_A', 'blur_B'} <= set(batch)
    assert len(list((tiny_dataset / 'blurA').glob('*.png'))) == 6
    with_blur = trainer.train_step(batch, 1)
    plain = _trainer(tiny_dataset, tmp_path, '--has_blur', 'True')
    without = plain.train_step({k: batch[k] for k in 'AB'}, 1)
    assert with_blur['D/adv_A'] > without['D/adv_A']   # extra "fake" terms


@pytest.mark.parametrize('flags', [['--aug_prob', '1'], ['--match_histograms', 'True', '--match_mode', 'rgb']])
def test_data_options_change_the_batches(tiny_dataset, tmp_path, flags):
    plain = next(train_stream(_trainer(tiny_dataset, tmp_path)))
    changed = next(train_stream(_trainer(tiny_dataset, tmp_path, *flags)))
    assert not torch.equal(plain['A'], changed['A']) or not torch.equal(plain['B'], changed['B'])


def _downsamplings(net: nn.Module) -> int:
    return sum(getattr(m, 'stride', None) == (2, 2) for m in net.modules())


@pytest.mark.parametrize('flags,check', [
    (['--sn', 'False'], lambda t: not any('weight_orig' in k for k in t.D.state_dict())),
    (['--use_se', 'True'], lambda t: any('.se.' in k for k in t.G.state_dict())),
    (['--use_deconv', 'True'], lambda t: any(isinstance(m, nn.ConvTranspose2d) for m in t.G.modules())),
    (['--attention_gan', '2', '--attention_input', 'True'], lambda t: hasattr(t.G['A2B'], 'attention_branch')),
    (['--n_global_dis', '5'], lambda t: _downsamplings(t.D['A']['G']) == 3),
    (['--light', '2'], lambda t: t.G['A2B'].FC[0].weight.shape[1] == 16 * 4),
    (['--cam_D_attention', 'False'], lambda t: not t.D['A']['G'].cam_attention),
])
def test_architecture_options_build_and_train(tiny_dataset, tmp_path, flags, check):
    trainer = _trainer(tiny_dataset, tmp_path, *flags)
    assert check(trainer)
    logs = trainer.train_step(_batch(), 1)
    assert torch.isfinite(logs['G/total'])


def test_attention_rows_in_previews(tiny_dataset, tmp_path):
    from model import DIRECTIONS
    trainer = _trainer(tiny_dataset, tmp_path, '--attention_gan', '3')
    columns = trainer.visual_columns(_batch()['A'], DIRECTIONS[0])
    assert len(columns) == 2 and len(columns[0]) == 7 + 3


def _train_tiny(tiny_dataset, out, *extra) -> None:
    assert main.main(tiny_flags(tiny_dataset, out, '--iteration', '3', '--save_freq', '3', *extra)) == 0


def test_test_phase_uses_ema_weights_unless_no_ema(tiny_dataset, tmp_path):
    out = tmp_path / 'r'
    # No LR decay: PT's schedule reaches lr 0 at the last of 3 steps, leaving the EMA copy within
    # rounding of the weights (the images then differed by chance of uint8 rounding, or not at all).
    _train_tiny(tiny_dataset, out, '--ema_start', '0', '--ema_beta', '0.5', '--lr', '0.01', '--decay_flag', 'False')
    state = checkpoints.load_checkpoint(out / 'tiny' / 'model' / 'tiny_params_0000003.pt')
    assert not torch.equal(state['genA2B']['conv1x1.weight'], state['genA2B_ema']['conv1x1.weight'])
    assert main.main(tiny_flags(tiny_dataset, out, '--phase', 'test')) == 0
    ema_img = cv2.imread(str(out / 'tiny' / 'test' / 'A2B' / 'img0.png'))
    assert main.main(tiny_flags(tiny_dataset, out, '--phase', 'test', '--no_ema', 'True')) == 0
    raw_img = cv2.imread(str(out / 'tiny' / 'test' / 'A2B' / 'img0.png'))
    assert not np.array_equal(ema_img, raw_img)
    # The EMA image is what the EMA generator gives.
    from checkpoints import load_translator
    from dataset import build_test_loader
    translator, _ = load_translator(out / 'tiny' / 'model' / 'tiny_params_0000003.pt', use_ema=True)
    images, names = next(iter(build_test_loader(tiny_dataset / 'testA', 32)))
    expected = image_arrays.tensor_to_uint8(translator.translate(images, 'A2B').image[0])
    assert names == ['img0']
    np.testing.assert_array_equal(cv2.cvtColor(ema_img, cv2.COLOR_BGR2RGB), expected)


def _write_video(path: Path, frames: int, size: tuple[int, int]) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), 10, size)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()


@pytest.mark.parametrize('crop', ['none', 'center'])
def test_video_phase_side_by_side(tiny_dataset, tmp_path, crop):
    out = tmp_path / 'r'
    _train_tiny(tiny_dataset, out)
    video = tmp_path / 'clip.mp4'
    _write_video(video, frames=5, size=(48, 36))
    target = tmp_path / 'videos'
    assert main.main(tiny_flags(tiny_dataset, out, '--phase', 'video', '--video_path', str(video),
                                '--out_dir', str(target), '--crop', crop)) == 0
    result = cv2.VideoCapture(str(target / 'clip_A2B.mp4'))
    assert int(result.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    assert (int(result.get(cv2.CAP_PROP_FRAME_WIDTH)), int(result.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (96, 36)
    result.release()
    assert main.main(tiny_flags(tiny_dataset, out, '--phase', 'video_dir', '--video_path', str(tmp_path),
                                '--out_dir', str(target))) == 0


def test_camera_without_device_is_a_clear_error(tiny_dataset, tmp_path, capsys):
    out = tmp_path / 'r'
    _train_tiny(tiny_dataset, out)
    assert main.main(tiny_flags(tiny_dataset, out, '--phase', 'camera', '--camera_id', '7')) == 2
    assert 'no camera' in capsys.readouterr().err
