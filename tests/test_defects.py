"""Regression tests for the defects found in review (issue: "Right by default"), one per defect."""
from __future__ import annotations

import pytest
import torch

import checkpoints
import utils
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


# ----------------------------------------------------------------------------------------------
# Defect 2: F2W's workflow, a baseline resumed with the group loss


def test_baseline_resumes_with_group_loss(tmp_path):
    from conftest import make_domain, tiny_flags

    import main
    root = tmp_path / 'groups'
    for g, colour in enumerate([(200, 60, 60), (60, 200, 60)]):
        for split, seed in (('trainA', 0), ('trainB', 10), ('testA', 20), ('testB', 30)):
            make_domain(root / split / str(g), 2, 40, colour, seed + g)
    out = tmp_path / 'out'
    assert main.main(tiny_flags(root, out, '--iteration', '2', '--save_freq', '2')) == 0
    # Crashed in D_optim.load_state_dict ("parameter group that doesn't match the size").
    assert main.main(tiny_flags(root, out, '--iteration', '4', '--save_freq', '2', '--resume', 'True',
                                '--group', '0,1', '--use_grouploss', 'True')) == 0
    state = checkpoints.load_checkpoint(out / 'groups' / 'model' / 'groups_params_0000004.pt')
    assert 'group_fc.weight_orig' in state['disGB'] and state['step'] == 4


# ----------------------------------------------------------------------------------------------
# Defect 3: the FaceNet fork's command line turns the loss on


def test_facenet_checkpoint_dir_alone_turns_the_face_loss_on(tiny_dataset, tmp_path, capsys):
    from conftest import tiny_trainer
    from facenet_pytorch import InceptionResnetV1

    import losses as L
    folder = tmp_path / 'facenet'
    folder.mkdir()
    torch.save(InceptionResnetV1(classify=False).state_dict(), folder / 'model.pt')
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--facenet_checkpoint_dir', str(folder))
    terms = [t for t in trainer.g_terms if isinstance(t, L.FaceDistanceTerm)]
    assert len(terms) == 1 and terms[0].weight == 1000.0
    assert 'face_distance_weight 1000' in capsys.readouterr().err
    explicit = tiny_trainer(tiny_dataset, tmp_path, '--facenet_checkpoint_dir', str(folder),
                            '--face_distance_weight', '5')
    assert [t.weight for t in explicit.g_terms] == [5.0]


# ----------------------------------------------------------------------------------------------
# Defect 4: img_dir --align_faces skips an unreadable file (and notes photos without a face)


def test_img_dir_align_faces_skips_unreadable_files(tmp_path, monkeypatch, capsys):
    from conftest import make_domain, tiny_flags

    import main
    from faceseg import align
    root = tmp_path / 'data'
    for split in ('trainA', 'trainB', 'testA', 'testB'):
        make_domain(root / split, 2, 40, (100, 100, 100), 0)
    assert main.main(tiny_flags(root, tmp_path / 'r', '--iteration', '1', '--save_freq', '1')) == 0
    photos = tmp_path / 'photos'
    make_domain(photos, 2, 48, (90, 90, 90), 5)
    (photos / 'a_broken.png').write_bytes(b'not an image')
    monkeypatch.setattr(align.FaceDetector, 'detect', lambda self, image: [])   # no face anywhere
    monkeypatch.setattr(align.FaceDetector, '__init__', lambda self, *a, **k: None)
    capsys.readouterr()
    assert main.main(['--phase', 'img_dir', '--img_dir', str(photos), '--align_faces', 'True', '--device', 'cpu',
                      '--checkpoint', str(tmp_path / 'r' / 'data' / 'model' / 'data_params_0000001.pt'),
                      '--out_dir', str(tmp_path / 'out')]) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['img0.png', 'img1.png']
    assert 'a_broken.png' in err and '1 unreadable skipped' in err
    assert err.count('no face found in') == 2 and '2 without a face' in err


# ----------------------------------------------------------------------------------------------
# Defects 5 and 6: flags that silently did something else


@pytest.mark.parametrize('argv,message', [
    (['--sn'], '--sn needs a value'),
    (['--cam_D_attention'], '--cam_D_attention needs a value'),
    (['--ada', 'True', '--ada_interval', '0'], '--ada_interval must be >= 1'),
    (['--ada', 'True', '--ada_kimg', '0'], '--ada_kimg > 0'),
    (['--ada', 'True', '--ada_target', '5'], '--ada_target must be in [-1, 1]'),
    (['--n_global_dis', '0'], '--n_global_dis must be >= 3'),
    (['--group_sampling', 'balanced'], '--group_sampling has no effect without --group'),
    (['--ema', 'False', '--ema_beta', '0.99'], '--ema_beta has no effect without --ema True'),
    (['--ada_p', '0.1'], '--ada_p has no effect without --ada True'),
    (['--match_mode', 'rgb'], '--match_mode has no effect without --match_histograms True'),
])
def test_flags_that_would_be_ignored_are_one_line_errors(tiny_dataset, tmp_path, argv, message, capsys):
    from conftest import tiny_flags

    import main
    assert main.main(tiny_flags(tiny_dataset, tmp_path, *argv)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1


def test_explicit_sn_values_still_work(tiny_dataset, tmp_path):
    from conftest import tiny_trainer
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--sn', 'False', '--cam_D_attention', 'False')
    names = [name for name, _ in trainer.D['A']['G'].named_parameters()]
    assert trainer.arch.sn is False and not any(name.endswith('weight_orig') for name in names)
    with_sn = tiny_trainer(tiny_dataset, tmp_path, '--sn', 'True')
    assert any(name.endswith('weight_orig') for name, _ in with_sn.D['A']['G'].named_parameters())


# ----------------------------------------------------------------------------------------------
# Defect 7: --compile also compiles the networks that translate at test time


def test_compile_flag_reaches_inference(tmp_path, monkeypatch):
    from conftest import make_domain, tiny_flags

    import main
    root = tmp_path / 'data'
    for split in ('trainA', 'trainB', 'testA', 'testB'):
        make_domain(root / split, 2, 40, (100, 100, 100), 0)
    assert main.main(tiny_flags(root, tmp_path / 'r', '--iteration', '1', '--save_freq', '1')) == 0
    calls = []

    class Recorded(torch.nn.Module):   # stands in for torch.compile's OptimizedModule
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *inputs):
            calls.append(type(self.module).__name__)
            return self.module(*inputs)

    def fake_compile(module, *args, **kwargs):   # inductor takes minutes on 2 cores; record instead
        return Recorded(module)

    monkeypatch.setattr(torch, 'compile', fake_compile)
    assert main.main(tiny_flags(root, tmp_path / 'r', '--phase', 'test', '--compile', 'True')) == 0
    assert calls and set(calls) == {'ResnetGenerator'}


# ----------------------------------------------------------------------------------------------
# EMA ramp-up: right at every run length


def test_ema_rampup_formula():
    ema = utils.EMA(torch.nn.Linear(1, 1), beta=0.9999, start_step=300, rampup=0.05)
    assert ema.beta_at(300) == 0.0                               # a copy up to the start
    assert ema.beta_at(600) == pytest.approx(0.5 ** (1 / 30))    # half-life 5% of 600 steps
    assert ema.beta_at(10 ** 6) == 0.9999                        # a long run: EN's decay
    assert utils.EMA(torch.nn.Linear(1, 1), 0.9999, 300, rampup=0).beta_at(600) == 0.9999


def test_short_run_ema_is_near_the_final_weights_not_the_start(tiny_dataset, tmp_path):
    """With the defaults (--ema_start 0.5, --ema_beta 0.9999) a short run's EMA stayed ≈97% the
    weights of the averaging start; with the ramp-up it follows the recent weights."""
    from conftest import random_batches, tiny_trainer
    steps = 60
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--iteration', str(steps), '--lr', '0.002')
    flat = lambda net: torch.cat([p.detach().flatten() for p in net.parameters()])  # noqa: E731
    at_start = None
    for step, batch in enumerate(random_batches(steps, seed=5), start=1):
        trainer.train_step(batch, step)
        if step == steps // 2:
            at_start = flat(trainer.G['A2B']).clone()
    final, ema = flat(trainer.G['A2B']), flat(trainer.ema['A2B'].model)
    assert (ema - final).norm() < 0.25 * (ema - at_start).norm()
    # Without the ramp-up (EN's behaviour) the EMA is stuck near the start weights.
    old = tiny_trainer(tiny_dataset, tmp_path, '--iteration', str(steps), '--lr', '0.002', '--ema_rampup', '0')
    for step, batch in enumerate(random_batches(steps, seed=5), start=1):
        old.train_step(batch, step)
    old_ema = flat(old.ema['A2B'].model)
    assert (old_ema - at_start).norm() < (old_ema - final).norm()
