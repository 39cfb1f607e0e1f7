"""CUDA-only behaviour made visible on the CPU (issue 16, findings 1-3, 6-8).

- The training device is played by ``meta``: anything a loader maps onto it is visibly not on the
  CPU, which is what ``torch.set_rng_state`` and numpy need (a CUDA-trained resume crashed there).
- fp16's GradScaler is an enabled ``torch.amp.GradScaler('cpu')``: it keeps the same bookkeeping
  (one ``update()`` per ``step()`` round) that crashed ``--amp fp16 --n_critic 2`` at step 3.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import random_batches, run_training, tiny_flags, tiny_trainer

import checkpoints
import dataset as data
import errors
import main
import run_folder
import training_loop
from step_memory import EarlyUpdates


def _record_map_locations(monkeypatch) -> list:
    """Patch torch.load so every call's ``map_location`` is recorded."""
    seen = []
    real_load = torch.load

    def load(*args, **kwargs):
        seen.append(kwargs.get('map_location'))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, 'load', load)
    return seen


def _trained_checkpoint(tiny_dataset, tmp_path, *extra: str):
    out = tmp_path / 'out'
    assert main.main(tiny_flags(tiny_dataset, out, '--iteration', '2', '--save_freq', '2', *extra)) == 0
    return out / 'tiny' / 'model' / 'tiny_params_0000002.pt'


def test_resume_reads_the_checkpoint_onto_the_cpu_whatever_the_training_device(tiny_dataset, tmp_path, monkeypatch):
    """Finding 1: RNG states must stay CPU tensors; before the fix they were mapped to the device."""
    _trained_checkpoint(tiny_dataset, tmp_path)
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--resume', 'True', '--iteration', '4')
    trainer.device = torch.device('meta')   # stands for cuda: a tensor mapped onto it is not on the CPU
    seen = _record_map_locations(monkeypatch)
    torch.manual_seed(999)
    run = training_loop.TrainingRun(trainer, trainer.config)
    found = run_folder.checkpoint_to_resume(run.files, run.dataset_root, trainer.arch)
    assert found is not None and found.step == 2
    trainer.load_state_dict(found.state)
    path = found.path
    assert seen and all(str(loc) == 'cpu' for loc in seen), seen
    saved = checkpoints.load_checkpoint(path)['rng']['torch']
    assert torch.equal(torch.get_rng_state(), saved)   # restored, not left at the seed above


def test_inference_loads_only_the_generators_onto_the_device(tiny_dataset, tmp_path, monkeypatch):
    """Finding 6: the whole training state (D, optimizers) stays on the CPU, mapped; only the two
    generators move to the device."""
    checkpoint = _trained_checkpoint(tiny_dataset, tmp_path)
    seen = _record_map_locations(monkeypatch)
    translator, state = checkpoints.load_translator(checkpoint, 'meta')
    assert seen and all(str(loc) == 'cpu' for loc in seen), seen
    assert all(p.device.type == 'meta' for net in translator.generators.values() for p in net.parameters())
    assert all(t.device.type == 'cpu' for t in state['disGA'].values())
    assert state['G_optim']['state'][0]['exp_avg'].device.type == 'cpu'


def _enable_fp16_scaler(trainer) -> None:
    """What --amp fp16 builds on CUDA, on the CPU: a GradScaler that really scales and counts."""
    trainer.scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)


@pytest.mark.parametrize('n_critic', ['1', '2', '3'])
def test_fp16_scaler_updates_once_per_iteration_with_n_critic(tiny_dataset, tmp_path, n_critic):
    """Finding 2: scaler.step(D) ran every step but update() only on G steps: crash at step 3."""
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--n_critic', n_critic)
    _enable_fp16_scaler(trainer)
    for step, batch in enumerate(random_batches(5), start=1):
        logs = trainer.train_step(batch, step)
        assert torch.isfinite(logs['D/total'])
    assert trainer.scaler.get_scale() == 2.0 ** 10   # finite gradients: no back-off within 2000 steps


def test_fp16_resume_from_a_run_without_a_scaler(tiny_dataset, tmp_path):
    """Finding 3: an --amp off/bf16 checkpoint stores an empty scaler state; an enabled scaler
    refused it ('The source state dict is empty')."""
    checkpoint = _trained_checkpoint(tiny_dataset, tmp_path)
    assert checkpoints.load_checkpoint(checkpoint)['scaler'] == {}
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--resume', 'True', '--iteration', '4')
    _enable_fp16_scaler(trainer)
    run = training_loop.TrainingRun(trainer, trainer.config)
    found = run_folder.checkpoint_to_resume(run.files, run.dataset_root, trainer.arch)
    assert found.path == checkpoint
    trainer.load_state_dict(found.state)
    assert trainer.scaler.get_scale() == 2.0 ** 10   # starts fresh
    trainer.train_step(random_batches(1)[0], 3)


def test_fp16_scaler_state_survives_resume(tiny_dataset, tmp_path):
    trainer = tiny_trainer(tiny_dataset, tmp_path)
    _enable_fp16_scaler(trainer)
    trainer.scaler.scale(torch.ones(()))
    trainer.scaler.update(new_scale=123.0)
    restored = tiny_trainer(tiny_dataset, tmp_path)
    _enable_fp16_scaler(restored)
    restored.load_state_dict(trainer.state_dict())
    assert restored.scaler.get_scale() == 123.0


@pytest.mark.parametrize('gan_type', ['wgan-gp', 'dragan'])
def test_gradient_penalty_differentiates_the_scaled_output(tiny_dataset, tmp_path, monkeypatch, gan_type):
    """Finding 7: AMP's gradient-penalty recipe. The output handed to autograd.grad is the scaled
    one (fp16 gradients would underflow otherwise), and the penalty is unchanged by the scale."""
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--gan_type', gan_type)
    batch = trainer._prepare(random_batches(1)[0])
    fake = batch['A'].flip(-1)

    def penalty(scale: float | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if scale is not None:
            trainer.scaler = torch.amp.GradScaler('cpu', init_scale=scale)
        outputs = []
        real_grad = torch.autograd.grad

        def grad(out, *args, **kwargs):
            outputs.append(out.detach())
            return real_grad(out, *args, **kwargs)

        monkeypatch.setattr(torch.autograd, 'grad', grad)
        trainer.step_rngs['penalty'].manual_seed(0)
        value = trainer._gradient_penalty('B', batch['B'], fake)
        monkeypatch.setattr(torch.autograd, 'grad', real_grad)
        return value.detach(), outputs

    plain, plain_outputs = penalty(None)
    scaled, scaled_outputs = penalty(2.0 ** 12)
    for raw, big in zip(plain_outputs, scaled_outputs, strict=True):
        torch.testing.assert_close(big, raw * 2.0 ** 12)
    torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-6)


def test_selective_backprop_group_comes_from_the_step_not_the_batch(tiny_dataset, tmp_path):
    """Finding 8: the base-group test read the device batch (a host sync per step); the step's
    round-robin group is the one every sample of that step's batch comes from."""
    for group in ('0', '1'):
        for domain in 'AB':
            sub = tiny_dataset / f'train{domain}' / group
            sub.mkdir()
            for image in sorted((tiny_dataset / f'train{domain}').glob('*.png'))[:2]:
                image.rename(sub / image.name)
    for image in list((tiny_dataset / 'trainA').glob('*.png')) + list((tiny_dataset / 'trainB').glob('*.png')):
        image.unlink()
    groups = [0, 1]
    stream = data.build_train_stream(tiny_dataset, 32, 2, seed=3, start_step=5, num_workers=0, groups=groups)
    for step in range(5, 11):
        batch = next(stream)
        assert batch['group_A'].tolist() == [data.round_robin_group(groups, step)] * 2
        assert batch['group_B'].tolist() == [data.round_robin_group(groups, step)] * 2


def test_generator_step_critic_is_the_compiled_one_under_compile(tiny_dataset, tmp_path):
    """Finding 8: the G step's D forward ran the uncompiled self.D under --compile."""
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--compile', 'True')   # compiled lazily: nothing runs here
    compiled = torch._dynamo.eval_frame.OptimizedModule
    for domain in 'AB':
        for scale in 'GL':
            local = trainer.D_local[domain][scale]
            assert isinstance(local, compiled) and local._orig_mod is trainer.D[domain][scale]
            assert trainer.D_run[domain][scale] is local   # one process: the same compiled module


def _fp16_on_the_cpu(trainer) -> None:
    """--amp fp16 as CUDA runs it, on the CPU (which autocasts to float16 too): validation refuses
    fp16 on a CPU, so the trainer is switched after it is built."""
    config = trainer.config
    trainer.config = dataclasses.replace(config, performance=dataclasses.replace(config.performance, amp='fp16'))
    trainer.early_updates = EarlyUpdates(trainer.G_optim, [])   # as fp16 builds it: the scaler sees every gradient
    _enable_fp16_scaler(trainer)
    trainer.scaler = torch.amp.GradScaler('cpu')   # PyTorch's default initial scale, 2^16


def test_fp16_overflowing_first_steps_are_skipped_not_a_divergence(tiny_dataset, tmp_path):
    """Seen on the first GPU run: wgan-gp under fp16 stopped at step 1 with 'D/gp_B became nan'. The
    GradScaler's first scale overflows the penalty's scaled gradient: that step's losses are nan and
    the scaler skips it and backs off, as AMP intends; the run must go on."""
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--gan_type', 'wgan-gp', '--iteration', '4', '--save_freq', '4')
    _fp16_on_the_cpu(trainer)
    run_training(trainer)
    state = checkpoints.load_checkpoint(tmp_path / 'out' / 'tiny' / 'model' / 'tiny_params_0000004.pt')
    assert state['step'] == 4 and state['scaler']['scale'] < 2.0 ** 16
    assert all(torch.isfinite(v).all() for v in state['genA2B'].values())


def test_fp16_run_whose_losses_stay_nonfinite_stops(tiny_dataset, tmp_path, monkeypatch):
    import ugatit
    monkeypatch.setattr(training_loop, 'MAX_SKIPPED_STEPS', 2)
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--iteration', '6', '--log_freq', '1')
    _fp16_on_the_cpu(trainer)
    real_step = ugatit.UGATIT.train_step

    def nan_step(self, batch, step):
        return {k: v * float('nan') for k, v in real_step(self, batch, step).items()}
    monkeypatch.setattr(ugatit.UGATIT, 'train_step', nan_step)
    with pytest.raises(errors.TrainingDiverged, match='not finite for the last 3 steps'):
        run_training(trainer)
