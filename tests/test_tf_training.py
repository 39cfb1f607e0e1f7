"""TF's training options in the trainer: --n_critic, the --epoch schedule, the kernel L2 term of
--arch tf, and FN's pair loss with --paired data."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_dataset, random_batches, tiny_flags, tiny_trainer, train_stream

import checkpoints
import errors
import main
import training_loop


def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_n_critic_updates_g_on_tf_steps_only(tiny_dataset, tmp_path):
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--n_critic', '3', '--ema_start', '0')
    g_updates, d_updates, ema_updates, logged_g = [], [], [], []
    for step, batch in enumerate(random_batches(7), start=1):
        g, d, ema = _copy(trainer.G), _copy(trainer.D), _copy(trainer.ema['A2B'].model)
        logs = trainer.train_step(batch, step)
        g_updates.append(_changed(g, trainer.G))
        d_updates.append(_changed(d, trainer.D))
        ema_updates.append(_changed(ema, trainer.ema['A2B'].model))
        logged_g.append('G/total' in logs)
    # TF: G is updated when (counter − 1) % n_critic == 0, i.e. steps 1, 4, 7.
    assert g_updates == [True, False, False, True, False, False, True]
    assert ema_updates == g_updates and logged_g == g_updates
    assert all(d_updates)


def test_critic_only_step_trains_d_on_the_same_fakes(tiny_dataset, tmp_path):
    """A critic-only step computes G(source) alone; D's loss equals that of a full step."""
    full = tiny_trainer(tiny_dataset, tmp_path)
    critic_only = tiny_trainer(tiny_dataset, tmp_path, '--n_critic', '2')
    critic_only.G.load_state_dict(full.G.state_dict())
    critic_only.D.load_state_dict(full.D.state_dict())
    batch = random_batches(1)[0]
    want = full.train_step(batch, 1)['D/total']      # step 1: both update
    got = critic_only.train_step(batch, 2)          # step 2: critic only
    assert 'G/total' not in got
    torch.testing.assert_close(got['D/total'], want, rtol=1e-5, atol=1e-6)


def test_loss_meter_averages_each_key_over_the_steps_that_logged_it():
    meter = training_loop.LossMeter()
    meter.add({'D/total': torch.tensor(1.0), 'G/total': torch.tensor(4.0)})
    meter.add({'D/total': torch.tensor(3.0)})
    assert meter.flush() == {'D/total': 2.0, 'G/total': 4.0}


def test_epoch_schedule_is_tfs(tiny_dataset, tmp_path):
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--lr', '0.3', '--epoch', '5', '--decay_epoch', '2',
                           '--iteration', '3')
    schedule = trainer.schedule
    assert (schedule.iterations, schedule.steps_per_epoch) == (15, 3)
    # epoch e = (step − 1) // 3; lr·(5 − e)/(5 − 2) from epoch 2, constant within an epoch
    want = [0.3] * 6 + [0.3] * 3 + [0.2] * 3 + [0.1] * 3
    assert [round(trainer.lr_at(s), 9) for s in range(1, 16)] == want
    default = tiny_trainer(tiny_dataset, tmp_path, '--epoch', '4', '--iteration', '2')
    assert default.schedule.decay_epoch == 2   # TF: 100 epochs, decay from 50
    assert (default.lr_at(6), default.lr_at(7)) == pytest.approx((1e-4, 1e-4 * (4 - 3) / (4 - 2)))
    tf_default = main.parse_args(tiny_flags(tiny_dataset, tmp_path / 'out', '--epoch', '3'))
    assert (tf_default.schedule.steps_per_epoch, tf_default.iterations) == (10000, 30000)   # TF's --iteration 10000
    flat = tiny_trainer(tiny_dataset, tmp_path, '--epoch', '4', '--iteration', '2', '--decay_flag', 'False')
    assert {flat.lr_at(s) for s in range(1, 9)} == {1e-4}


def test_epoch_run_trains_epoch_times_iteration_steps(tiny_dataset, tmp_path):
    out = tmp_path / 'r'
    assert main.main(tiny_flags(tiny_dataset, out, '--epoch', '2', '--iteration', '2', '--save_freq', '100')) == 0
    state = checkpoints.load_checkpoint(out / 'tiny' / 'model' / 'tiny_params_0000004.pt')
    assert state['step'] == 4 and state['lr'] == pytest.approx(1e-4 * 1 / 1)   # epoch 1 of 2, decay from 1


@pytest.mark.parametrize('graph', ['current', '2019'])
def test_arch_tf_regularises_kernels_with_a_loss_term(tiny_dataset, tmp_path, graph):
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--arch', 'tf', '--tf_graph', graph, '--n_res', '4',
                           '--weight_decay', '0.01')
    assert all(group['weight_decay'] == 0.0 for opt in (trainer.G_optim, trainer.D_optim)
               for group in opt.param_groups)

    # Hand count: kernels are the ≥2-D 'weight' ('weight_orig' under spectral norm) tensors; norm
    # scales, biases and rho are 1-D or named otherwise. TF 2019 made G's CAM scaling kernel unregularised.
    def hand(net, skip=()):
        kernels = [p for name, p in net.named_parameters()
                   if name.rsplit('.', 1)[-1] in ('weight', 'weight_orig') and p.dim() >= 2
                   and not name.endswith(skip)]
        return 0.01 * sum(float((p.detach().double() ** 2).sum()) for p in kernels) / 2

    skip = ('cam.fc.weight',) if graph == '2019' else ()
    want_g, want_d = hand(trainer.G, skip), hand(trainer.D)
    logs = trainer.train_step(random_batches(1)[0], 1)
    assert logs['G/l2'].item() == pytest.approx(want_g, rel=1e-5)
    assert logs['D/l2'].item() == pytest.approx(want_d, rel=1e-5)
    pt = tiny_trainer(tiny_dataset, tmp_path)
    assert 'G/l2' not in pt.train_step(random_batches(1)[0], 1)
    assert pt.G_optim.param_groups[0]['weight_decay'] == 1e-4


def test_kernel_l2_gradient_is_weight_times_kernel():
    import losses
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.InstanceNorm2d(3, affine=True), torch.nn.Linear(4, 5))
    losses.KernelL2(net, 0.5)().backward()
    torch.testing.assert_close(net[0].weight.grad, 0.5 * net[0].weight.detach())
    torch.testing.assert_close(net[2].weight.grad, 0.5 * net[2].weight.detach())
    assert net[0].bias.grad is None and net[1].weight.grad is None and net[2].bias.grad is None


@pytest.fixture
def paired_dataset(tmp_path):
    return make_dataset(tmp_path / 'paired', (4, 4, 1, 1))


def test_pair_loss_matches_hand_computation(paired_dataset, tmp_path):
    trainer = tiny_trainer(paired_dataset, tmp_path, '--paired', 'True', '--pair_weight', '2.5')
    batch = next(train_stream(trainer))
    with torch.no_grad():
        a2b = trainer.G['A2B'](batch['A']).image
        b2a = trainer.G['B2A'](batch['B']).image
    logs = trainer.train_step(batch, 1)
    assert logs['G/pair_A2B'].item() == pytest.approx(2.5 * (a2b - batch['B']).abs().mean().item(), rel=1e-5)
    assert logs['G/pair_B2A'].item() == pytest.approx(2.5 * (b2a - batch['A']).abs().mean().item(), rel=1e-5)
    terms = sum(v for k, v in logs.items() if k.startswith('G/') and k != 'G/total')
    torch.testing.assert_close(logs['G/total'], terms, rtol=1e-5, atol=1e-5)


def test_paired_training_rejects_mismatched_stems(paired_dataset, tmp_path, capsys):
    shutil.move(paired_dataset / 'trainB' / 'img3.png', paired_dataset / 'trainB' / 'other.png')
    code = main.main(tiny_flags(paired_dataset, tmp_path / 'r', '--paired', 'True', '--iteration', '1'))
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1
    assert 'only in trainA: img3' in err and 'only in trainB: other' in err


@pytest.mark.parametrize('bad,message', [
    (('--n_critic', '0'), '--n_critic'),
    (('--GP_ld', '-1'), '--GP_ld'),
    (('--epoch', '3', '--decay_epoch', '4'), '--decay_epoch'),
    (('--decay_epoch', '2'), 'without --epoch'),
    (('--epoch', '0'), '--epoch'),
    (('--pair_weight', '1'), '--paired True'),
    (('--pair_weight', '-1', '--paired', 'True'), '--pair_weight'),
    (('--augment_flag', 'True', '--aug_prob', '0.5'), '--aug_prob'),
    (('--gan_type', 'hinge2'), 'invalid choice'),
])
def test_bad_tf_training_flags_are_one_line_errors(tiny_dataset, tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) if bad[0] == '--gan_type' else pytest.raises(errors.UserError, match=message):
        main.parse_args(tiny_flags(tiny_dataset, tmp_path / 'r', *bad))
    if bad[0] == '--gan_type':
        assert message in capsys.readouterr().err


def test_penalty_with_d_cam_masks_is_rejected(tiny_dataset, tmp_path):
    weights = tmp_path / 'bisenet.pth'
    weights.write_bytes(b'')
    with pytest.raises(errors.UserError, match='--seg_D_cam'):
        main.parse_args(tiny_flags(tiny_dataset, tmp_path / 'r', '--gan_type', 'dragan', '--seg_D_cam_fea_mask',
                                   '--faceseg_weights', str(weights)))


def test_help_shows_the_tf_training_flags_in_their_groups():
    text = main.build_parser().format_help()
    groups = {'loss weights': ('--gan_type', '--GP_ld', '--pair_weight'),
              'optimisation': ('--epoch', '--decay_epoch', '--n_critic'),
              'data': ('--augment_flag', '--paired')}
    sections = {}
    for block in text.split('\n\n'):
        title = block.split(':', 1)[0].strip()
        sections[title] = block
    for group, flags in groups.items():
        for flag in flags:
            assert f'  {flag} ' in sections[group], (group, flag)
    assert '(default: lsgan)' in sections['loss weights'] and '(default: 10.0)' in sections['loss weights']
