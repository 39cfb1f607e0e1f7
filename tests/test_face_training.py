"""Face-aware training inside the trainer: FaceNet identity loss and the face-parsing options.

FaceNet and BiSeNet get random weights, saved to a temp file and loaded through the flags, exactly
as a user's downloaded weights would be.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import record_gradients, tiny_flags, train_stream

import losses as L
import main
from faceseg import FaceSegmenter, SegMasks
from ugatit import UGATIT


@pytest.fixture(scope='module')
def weight_files(face_weight_files) -> dict[str, Path]:
    return face_weight_files


def _half_face_masks(images: torch.Tensor) -> SegMasks:
    """Hand-made masks: face on the left half, eroded face on the left 40% (a random BiSeNet
    calls almost everything face, which would hide what the flags do)."""
    width = images.shape[-1]
    face = torch.zeros_like(images[:, :1])
    face[..., : width // 2] = 1
    eroded = torch.zeros_like(face)
    eroded[..., : int(width * 0.4)] = 1
    return SegMasks(face, eroded)


def _trainer(dataset: Path, tmp_path: Path, *extra: str) -> UGATIT:
    return UGATIT(main.parse_args(tiny_flags(dataset, tmp_path / 'out', '--batch_size', '3', *extra)))


def _batch(trainer: UGATIT) -> dict[str, torch.Tensor]:
    return next(train_stream(trainer))


def _step_pair(dataset, tmp_path, weights, *flags):
    """(logs, generator gradients) for a baseline trainer and one with ``flags``, same weights and batch."""
    base = _trainer(dataset, tmp_path)
    other = _trainer(dataset, tmp_path, '--faceseg_weights', str(weights['bisenet']), *flags)
    other.face_masking.segmenter = _half_face_masks
    other.G.load_state_dict(base.G.state_dict())
    other.D.load_state_dict(base.D.state_dict())
    batch = _batch(base)
    base_grads, other_grads = record_gradients(base.G), record_gradients(other.G)
    return (base.train_step(batch, 1), base_grads), (other.train_step(batch, 1), other_grads)


def test_face_distance_term_in_the_step(tiny_dataset, tmp_path, weight_files):
    trainer = _trainer(tiny_dataset, tmp_path, '--face_distance_weight', '0.5',
                       '--facenet_weights', str(weight_files['facenet']))
    term = next(t for t in trainer.g_terms if isinstance(t, L.FaceDistanceTerm))
    facenet_before = {k: v.clone() for k, v in term.identity.state_dict().items()}
    batch = trainer._prepare(_batch(trainer))
    with torch.no_grad():
        translations = trainer.generate(batch)
        expected = {d: 0.5 * term.identity(batch[src], translations[d].fake.image).mean()
                    for d, src in (('A2B', 'A'), ('B2A', 'B'))}
    logs = trainer.train_step(batch, 1)
    for d in ('A2B', 'B2A'):
        torch.testing.assert_close(logs[f'G/face_distance_{d}'], expected[d], rtol=1e-4, atol=1e-9)
        assert logs[f'G/face_distance_{d}'] > 0
    assert all(p.grad is None for p in term.identity.parameters())
    for key, value in term.identity.state_dict().items():
        torch.testing.assert_close(value, facenet_before[key], rtol=0, atol=0)


def test_face_distance_gradient_reaches_generator(tiny_dataset, tmp_path, weight_files):
    trainer = _trainer(tiny_dataset, tmp_path, '--face_distance_weight', '1',
                       '--facenet_weights', str(weight_files['facenet']))
    term = next(t for t in trainer.g_terms if isinstance(t, L.FaceDistanceTerm))
    batch = trainer._prepare(_batch(trainer))
    fake = trainer.G['A2B'](batch['A'])
    loss = term(L.DirectionContext('A2B', batch['A'], batch['B'], fake, []))
    loss.backward()
    grads = [p.grad for p in trainer.G['A2B'].parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in term.identity.parameters())


def test_facenet_is_never_built_when_the_weight_is_zero(tiny_dataset, tmp_path, monkeypatch):
    import faceseg.facenet

    def fail(*args, **kwargs):
        raise AssertionError('FaceNet built although --face_distance_weight is 0')
    monkeypatch.setattr(faceseg.facenet, 'load_facenet', fail)
    trainer = _trainer(tiny_dataset, tmp_path)
    assert not any(isinstance(t, L.FaceDistanceTerm) for t in trainer.g_terms)


def test_seg_fix_weight_is_l1_on_the_background(tiny_dataset, tmp_path, weight_files):
    trainer = _trainer(tiny_dataset, tmp_path, '--faceseg_weights', str(weight_files['bisenet']),
                       '--seg_fix_weight', '2')
    assert isinstance(trainer.face_masking.segmenter, FaceSegmenter)  # the real parser, loaded from the flag
    trainer.face_masking.segmenter = _half_face_masks
    batch = trainer._prepare(_batch(trainer))
    with torch.no_grad():
        masks = trainer.face_masking(batch)
        fake = trainer.generate(batch)['A2B'].fake.image
    background = 1 - masks.of('A').eroded
    expected = 2 * (fake * background - batch['A'] * background).abs().mean()
    logs = trainer.train_step(batch, 1)
    torch.testing.assert_close(logs['G/seg_fix_A2B'], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('flag', ['--seg_D_mask', '--seg_D_cam_inp_mask', '--seg_D_cam_fea_mask'])
def test_discriminator_mask_flags_change_d_losses_only(tiny_dataset, tmp_path, weight_files, flag):
    (base, _), (masked, _) = _step_pair(tiny_dataset, tmp_path, weight_files, flag, 'True')
    assert not torch.allclose(base['D/adv_B'], masked['D/adv_B'])
    assert not torch.allclose(base['D/adv_A'], masked['D/adv_A'])
    torch.testing.assert_close(base['G/cycle_A2B'], masked['G/cycle_A2B'], rtol=0, atol=0)


def test_seg_g_detach_keeps_losses_and_changes_generator_gradients(tiny_dataset, tmp_path, weight_files):
    (base, plain), (detached, other) = _step_pair(tiny_dataset, tmp_path, weight_files, '--seg_G_detach', 'True')
    for key in ('G/adv_A2B', 'G/cycle_A2B', 'D/adv_B'):
        torch.testing.assert_close(base[key], detached[key], rtol=1e-5, atol=1e-6)
    assert plain.keys() == other.keys() and plain
    assert any(not torch.allclose(plain[name], other[name]) for name in plain)


def test_face_options_train_resume_and_test(tiny_dataset, tmp_path, weight_files):
    out = tmp_path / 'run'
    flags = ('--face_distance_weight', '0.5', '--facenet_weights', str(weight_files['facenet']),
             '--faceseg_weights', str(weight_files['bisenet']), '--seg_fix_weight', '1', '--seg_D_mask', 'True',
             '--save_freq', '1', '--print_freq', '1')
    assert main.main(tiny_flags(tiny_dataset, out, '--iteration', '1', *flags)) == 0
    assert main.main(tiny_flags(tiny_dataset, out, '--iteration', '2', '--resume', 'True', *flags)) == 0
    run = out / 'tiny'
    assert (run / 'model' / 'tiny_params_0000002.pt').exists()
    assert (run / 'img' / 'A2B_0000002.png').exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / 'logs'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'G_A_face_distance', 'G_B_face_distance', 'G/seg_fix_A2B', 'D/real_acc_B'} <= tags
    assert main.main(tiny_flags(tiny_dataset, out, '--phase', 'test', *flags)) == 0
    assert len(list((run / 'test' / 'A2B').glob('*.png'))) == 3


def test_missing_face_weights_name_the_flag(tiny_dataset, tmp_path, capsys):
    assert main.main(tiny_flags(tiny_dataset, tmp_path, '--seg_D_mask', 'True',
                                '--faceseg_weights', str(tmp_path / 'nope.pth'))) == 2
    assert '--faceseg_weights' in capsys.readouterr().err
    assert main.main(tiny_flags(tiny_dataset, tmp_path, '--face_distance_weight', '1')) == 2
    err = capsys.readouterr().err
    assert '--facenet_weights' in err and 'Traceback' not in err
