"""--arch tf and the TF checkpoint converter, checked against the official TensorFlow outputs.

The reference checkpoints in tests/data/tf were written by the official TF code (HEAD and the
2019-08-15 graph) with random, perturbed weights; reference.npz holds what that code computed.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_batches, tiny_flags, tiny_trainer

import checkpoints
import errors
import main
import networks as N
import run_folder
import tf_checkpoint as T
import training_loop
from model import ArchConfig, build_critic, build_generator
from scripts import convert_tf_checkpoint as C

DATA = Path(__file__).resolve().parent / 'data' / 'tf'
IMG_SIZE = {'tf_head_light64': 64, 'tf_2019_full64': None}   # a light model does not record its size
DIRECTIONS = {'A2B': 'genA2B', 'B2A': 'genB2A'}


@pytest.fixture(scope='module')
def converted() -> dict[str, dict]:
    return {name: C.convert(DATA / name / 'ckpt', smoothing=True, img_size=size) for name, size in IMG_SIZE.items()}


def _reference(name: str):
    return np.load(DATA / name / 'reference.npz')


def _stems(ref, direction: str) -> list[str]:
    return sorted({k.split('/')[1] for k in ref.files if k.startswith(direction + '/')})


def _generator(state: dict, key: str) -> N.ResnetGenerator:
    net = build_generator(ArchConfig.from_dict(state['config']))
    net.load_state_dict(state[key])
    return net.eval()


def _nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# The architecture


def test_tf_padding_rule():
    tf = N.Arch('tf')
    assert tf.pad_amounts(3, 2, 1) == (1, 0)     # G's down-sampling convs
    assert tf.pad_amounts(4, 1, 1) == (1, 2)     # D's stride-1 convs
    assert tf.pad_amounts(4, 2, 1) == (1, 1) and tf.pad_amounts(7, 1, 3) == (3, 3)
    assert N.PT.pad_amounts(3, 2, 1) == (1, 1) and N.PT.pad_amounts(4, 1, 1) == (1, 1)
    # TF keeps D's size through its stride-1 convs: 8×8 and 32×32 patch maps at 256 px (PT: 6 and 30).
    assert N.discriminator_output_size(256, 7, tf) == 8 and N.discriminator_output_size(256, 5, tf) == 32
    assert N.discriminator_output_size(256, 7) == 6
    assert N.min_image_size(7, tf) == 96 and N.discriminator_output_size(95, 7, tf) == 0


def test_tf_generator_parameters_and_initialisation():
    torch.manual_seed(0)
    gen = N.ResnetGenerator(3, 3, ngf=8, n_blocks=4, img_size=32, light=True, arch=N.Arch('tf'))
    state = gen.state_dict()
    convs = [m for m in gen.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(m.bias is not None for m in convs)                       # TF: biases everywhere
    assert all(torch.all(m.bias == 0) for m in convs)                  # zero-initialised
    kernels = torch.cat([m.weight.flatten() for m in convs])
    assert abs(kernels.std().item() - 0.02) < 0.002 and abs(kernels.mean().item()) < 0.002   # N(0, 0.02)
    assert 'DownBlock.2.weight' in state and 'DownBlock.12.conv_block.2.bias' in state   # affine encoder norms
    assert torch.all(gen.UpBlock1_1.norm1.rho == 1) and torch.all(gen.UpBlock2[3].rho == 0)
    assert 'gap_fc.weight' not in state and state['cam.fc.weight'].shape == (1, 32)
    with pytest.raises(ValueError, match='n_blocks 4'):
        N.ResnetGenerator(3, 3, ngf=8, n_blocks=3, img_size=32, light=True, arch=N.Arch('tf'))


def test_2019_graph_has_a_separate_cam_logit_fc():
    gen = N.ResnetGenerator(3, 3, ngf=8, n_blocks=4, img_size=32, light=True, arch=N.Arch('tf', '2019'))
    assert {'cam.fc.weight', 'cam.fc.bias', 'cam.logit_fc.weight', 'cam.logit_fc.bias'} <= set(gen.state_dict())
    critic = N.Discriminator(3, ndf=4, n_layers=5, arch=N.Arch('tf', '2019'))
    assert not any('logit_fc' in k for k in critic.state_dict())   # D's CAM FC is spectral-normalised


def test_tf_adailn_is_biased_and_smoothed():
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    gamma, beta = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    norm = N.adaILN(4, rho_init=1.0, smoothing=True, unbiased=False).double()
    with torch.no_grad():
        norm.rho.copy_(torch.tensor([0.0, 0.05, 0.5, 1.0]).view(1, 4, 1, 1))
    a = x.numpy()
    inst = (a - a.mean((2, 3), keepdims=True)) / np.sqrt(a.var((2, 3), keepdims=True) + 1e-5)
    layer = (a - a.mean((1, 2, 3), keepdims=True)) / np.sqrt(a.var((1, 2, 3), keepdims=True) + 1e-5)
    rho = np.array([0.0, 0.0, 0.4, 0.9]).reshape(1, 4, 1, 1)   # clip(rho - 0.1, 0, 1)
    expected = (rho * inst + (1 - rho) * layer) * gamma.numpy()[:, :, None, None] + beta.numpy()[:, :, None, None]
    np.testing.assert_allclose(norm(x, gamma, beta).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


def test_arch_rejects_inconsistent_options():
    with pytest.raises(ValueError):
        N.Arch('pt', smoothing=True)
    with pytest.raises(ValueError):
        N.Arch('tf', graph='2018')


# ----------------------------------------------------------------------------------------------
# Converted checkpoints against the official outputs


def test_inferred_architectures(converted):
    light, full = converted['tf_head_light64']['config'], converted['tf_2019_full64']['config']
    assert (light['light'], light['ch'], light['img_size'], light['tf_graph']) == (True, 2, 64, 'current')
    assert (full['light'], full['ch'], full['img_size'], full['tf_graph']) == (False, 4, 64, '2019')
    for cfg in (light, full):
        assert (cfg['arch'], cfg['n_res'], cfg['n_global_dis'], cfg['n_local_dis'], cfg['sn']) == ('tf', 4, 7, 5, True)
        assert cfg['smoothing'] is True
    assert converted['tf_head_light64']['source']['tf_step'] == 1000


@pytest.mark.parametrize('name', list(IMG_SIZE))
@pytest.mark.parametrize('direction', list(DIRECTIONS))
def test_converted_generators_reproduce_official_outputs(converted, name, direction):
    ref = _reference(name)
    net = _generator(converted[name], DIRECTIONS[direction])
    for stem in _stems(ref, direction):
        with torch.no_grad():
            out = net(_nchw(ref[f'{direction}/{stem}/input']))
        np.testing.assert_allclose(out.image.permute(0, 2, 3, 1).numpy(), ref[f'{direction}/{stem}/image'],
                                   rtol=0, atol=1e-4)
        np.testing.assert_allclose(out.cam_logit.numpy(), ref[f'{direction}/{stem}/cam_logit'], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(out.heatmap[0, 0].numpy(), ref[f'{direction}/{stem}/heatmap'],
                                   rtol=1e-5, atol=1e-4)


def _png(path: Path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert('RGB')).astype(np.int16)


def _official_png(image: np.ndarray) -> np.ndarray:
    return np.round((np.clip(image[0], -1, 1) + 1) * 127.5).astype(np.int16)


@pytest.mark.parametrize('name', list(IMG_SIZE))
def test_converted_checkpoint_translates_through_main_without_model_flags(tmp_path, name):
    """convert, then main.py --phase img_dir with only --checkpoint: the official translations to
    within one 8-bit level; float outputs (both directions) within 1e-4 through load_translator."""
    out = tmp_path / 'converted.pt'
    assert C.main([str(DATA / name / 'ckpt'), str(out)] + (['--img_size', '64'] if IMG_SIZE[name] else [])) == 0
    assert main.main(['--phase', 'img_dir', '--img_dir', str(DATA / name / 'inputs' / 'testA'),
                      '--checkpoint', str(out), '--out_dir', str(tmp_path / 'A2B'), '--result_dir', str(tmp_path / 'r'),
                      '--device', 'cpu', '--num_workers', '0']) == 0
    ref = _reference(name)
    for stem in _stems(ref, 'A2B'):
        written = _png(tmp_path / 'A2B' / f'{stem}.png')
        assert np.abs(written - _official_png(ref[f'A2B/{stem}/image'])).max() <= 1
    translator, _ = checkpoints.load_translator(out)
    for direction in DIRECTIONS:
        for stem in _stems(ref, direction):
            fake = translator.translate(_nchw(ref[f'{direction}/{stem}/input']), direction)
            np.testing.assert_allclose(fake.image.permute(0, 2, 3, 1).numpy(), ref[f'{direction}/{stem}/image'],
                                       atol=1e-4)
            np.testing.assert_allclose(fake.cam_logit.numpy(), ref[f'{direction}/{stem}/cam_logit'], atol=1e-4)
            np.testing.assert_allclose(fake.heatmap[0, 0].numpy(), ref[f'{direction}/{stem}/heatmap'], atol=1e-4)


def test_smoothing_flag_matters(converted):
    """The comparison above can tell smoothing on from off (SPEC: errors 0.07–0.48 when flipped)."""
    name = 'tf_head_light64'
    ref = _reference(name)
    state = C.convert(DATA / name / 'ckpt', smoothing=False, img_size=64)
    stem = _stems(ref, 'A2B')[0]
    with torch.no_grad():
        image = _generator(state, 'genA2B')(_nchw(ref[f'A2B/{stem}/input'])).image
    assert np.abs(image.permute(0, 2, 3, 1).numpy() - ref[f'A2B/{stem}/image']).max() > 1e-2


@pytest.mark.parametrize('name', list(IMG_SIZE))
@pytest.mark.parametrize('domain', ['A', 'B'])
def test_converted_discriminators_reproduce_official_outputs(converted, name, domain):
    """Logits, CAM logits and heatmaps of one training-mode run, and u after its power iteration."""
    state, ref = converted[name], _reference(name)
    critic = build_critic(ArchConfig.from_dict(state['config']), domain)
    x = _nchw(ref[f'D_{domain}/input'])
    for scale, tf_scale in (('G', 'global'), ('L', 'local')):
        net = critic[scale]
        net.load_state_dict(state[f'dis{scale}{domain}'])
        with torch.no_grad():
            out = net.train()(x)
        np.testing.assert_allclose(out.logit.permute(0, 2, 3, 1).numpy(), ref[f'D_{domain}/{tf_scale}_logit'],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.cam_logit.numpy(), ref[f'D_{domain}/{tf_scale}_cam_logit'], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.heatmap[0, 0].numpy(), ref[f'D_{domain}/{tf_scale}_heatmap'],
                                   rtol=1e-5, atol=1e-5)
        depth = state['config'][f'n_{tf_scale}_dis']
        rules = {r.tf_name: r.key for r in C.critic_rules(depth, True, state['config']['tf_graph'])}
        prefix = f'D_{domain}/u_after/discriminator_{domain}/{tf_scale}/'
        u_after = {k[len(prefix):]: ref[k] for k in ref.files if k.startswith(prefix)}
        assert len(u_after) == depth + 1
        for tf_name, value in u_after.items():
            np.testing.assert_allclose(net.state_dict()[rules[tf_name]].numpy(), value.reshape(-1), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Converter behaviour and errors


def _official_tensors(name: str) -> dict[str, np.ndarray]:
    ckpt = T.TFCheckpoint(DATA / name / 'ckpt')
    return {k: ckpt.read(k) for k in ckpt}


@pytest.mark.parametrize('name', list(IMG_SIZE))
def test_converter_rules_name_exactly_what_tf_writes(name):
    """The rules read backwards give TF's own variable listing (optimizer slots aside)."""
    listed = json.loads((DATA / name / 'variables.json').read_text())
    arch = C.infer_arch({k: tuple(v) for k, v in listed.items()}, img_size=IMG_SIZE[name])
    assert C.tf_shapes(arch) == {k: tuple(v) for k, v in listed.items() if not C.OPTIMIZER_SLOT.search(k)}


VARIANTS = [dict(light=True, img_size=128, tf_graph='2019', sn=True, n_dis=6),
            dict(light=False, img_size=32, tf_graph='current', sn=False, n_dis=4),
            dict(light=False, img_size=48, tf_graph='2019', sn=False, n_dis=5),
            dict(light=True, img_size=256, tf_graph='current', sn=True, n_dis=3, has_discriminators=False)]


def _tf_arch(**variant) -> dict:
    """An architecture dict as infer_arch returns it (TF's n_dis gives both depths)."""
    arch = {'arch': 'tf', 'smoothing': False, 'ch': 2, 'n_res': 4, 'img_ch': 3, 'use_se': False, 'attention_gan': 0,
            'attention_input': False, 'use_deconv': False, 'cam_D_attention': True, 'cam_D_weight': 1.0,
            'use_grouploss': False, 'groups': None, 'has_discriminators': True, **variant}
    return {**arch, 'n_global_dis': arch['n_dis'] + 1, 'n_local_dis': arch['n_dis'] - 1}


def _random_tf_checkpoint(prefix: Path, arch: dict) -> None:
    rng = np.random.default_rng(0)
    T.write_checkpoint(prefix, {k: rng.standard_normal(s).astype(np.float32) * 0.1
                                for k, s in C.tf_shapes(arch).items()})


@pytest.mark.parametrize('variant', VARIANTS)
def test_any_variant_is_inferred_and_converts(tmp_path, variant):
    """Light/full, both graphs, with or without spectral norm, any depth: inferred from the variables
    alone, converted, and loaded strictly into the networks the stored config builds."""
    arch = _tf_arch(**variant)
    shapes = C.tf_shapes(arch)
    light_size = arch['img_size'] if arch['light'] else None
    assert C.infer_arch(shapes, smoothing=False, img_size=light_size) == (
        arch if arch['has_discriminators'] else {**arch, 'sn': True, 'n_global_dis': 7, 'n_local_dis': 5, 'n_dis': 6})
    _random_tf_checkpoint(tmp_path / 'UGATIT.model-3', arch)
    state = C.convert(tmp_path, smoothing=False, img_size=light_size)
    size = arch['img_size']
    with torch.no_grad():
        out = _generator(state, 'genA2B')(torch.rand(1, 3, size, size) * 2 - 1)
    assert out.image.shape == (1, 3, size, size) and torch.isfinite(out.image).all()


def test_converted_checkpoint_fine_tunes_with_resume(tiny_dataset, tmp_path):
    """README's recipe: put the converted file where the run's checkpoints go and --resume; the
    weights are the converted ones, optimizer moments start fresh, training continues from step 1."""
    import checkpoints
    from ugatit import UGATIT
    arch = _tf_arch(light=False, img_size=32, tf_graph='2019', sn=True, n_dis=4)
    _random_tf_checkpoint(tmp_path / 'tf' / 'UGATIT.model-500000', arch)
    cfg = main.parse_args(tiny_flags(tiny_dataset, tmp_path / 'out', '--arch', 'tf', '--tf_graph', '2019',
                                     '--light', 'False', '--ch', '2', '--n_res', '4', '--n_global_dis', '5',
                                     '--n_local_dis', '3', '--iteration', '3', '--resume', 'True'))
    target = run_folder.RunFiles(cfg.run.result_dir, cfg.run.dataset_name).checkpoint_path(0)
    assert C.main([str(tmp_path / 'tf'), str(target)]) == 0
    trainer = UGATIT(cfg)
    # resumed from the converted step-0 file
    assert training_loop.TrainingRun(trainer, cfg)._start_step() == 1 and trainer.step == 0
    converted = checkpoints.load_checkpoint(target)
    for key in ('genA2B', 'disGB', 'disLA'):
        for name, value in trainer.pt_module(key).state_dict().items():
            torch.testing.assert_close(value, converted[key][name], rtol=0, atol=0)
    logs = trainer.train_step(random_batches(1)[0], trainer.step + 1)
    assert all(torch.isfinite(v) for v in logs.values())


def test_smoothing_is_read_from_tf_run_folder_names(tmp_path):
    """TF names its run folder ..._sn_smoothing when trained with --smoothing True (the released
    selfie2anime folder is so named); an explicit --smoothing wins, a renamed folder means True."""
    import shutil
    source = DATA / 'tf_2019_full64' / 'ckpt'
    plain = tmp_path / 'UGATIT_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_sn'
    smoothed = tmp_path / 'UGATIT_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_sn_smoothing'
    for folder in (plain, smoothed):
        shutil.copytree(source, folder)
    assert C.convert(plain)['config']['smoothing'] is False
    assert C.convert(smoothed)['config']['smoothing'] is True
    assert C.convert(smoothed, smoothing=False)['config']['smoothing'] is False
    assert C.convert(source)['config']['smoothing'] is True


def test_generators_alone_are_enough(tmp_path):
    tensors = {k: v for k, v in _official_tensors('tf_2019_full64').items() if k.startswith('generator_')}
    T.write_checkpoint(tmp_path / 'UGATIT.model-5', tensors)
    state = C.convert(tmp_path)
    assert {k for k in state if k.startswith(('gen', 'dis'))} == {'genA2B', 'genB2A'}
    ref = _reference('tf_2019_full64')
    stem = _stems(ref, 'B2A')[0]
    with torch.no_grad():
        image = _generator(state, 'genB2A')(_nchw(ref[f'B2A/{stem}/input'])).image
    np.testing.assert_allclose(image.permute(0, 2, 3, 1).numpy(), ref[f'B2A/{stem}/image'], atol=1e-4)


def test_unknown_and_missing_variables_are_listed_in_one_error(tmp_path):
    tensors = _official_tensors('tf_head_light64')
    tensors['generator_A/extra_layer/kernel'] = np.zeros(3, np.float32)
    del tensors['generator_B/up_conv_1/conv2d/bias']
    del tensors['discriminator_A/local/D_logit/u']
    T.write_checkpoint(tmp_path / 'UGATIT.model-5', tensors)
    with pytest.raises(errors.UserError) as error:
        C.convert(tmp_path, img_size=64)
    message = str(error.value)
    assert '1 unknown variable(s): generator_A/extra_layer/kernel' in message
    assert 'generator_B/up_conv_1/conv2d/bias' in message and 'discriminator_A/local/D_logit/u' in message
    assert 'Adam' not in message and 'beta1_power' not in message   # optimizer slots are ignored, not unknown


def test_not_a_ugatit_checkpoint(tmp_path):
    T.write_checkpoint(tmp_path / 'other-1', {'dense/kernel': np.zeros((2, 2), np.float32)})
    with pytest.raises(errors.UserError, match='no generator_A/generator_B'):
        C.convert(tmp_path)
    with pytest.raises(errors.UserError, match='trained at 64 px'):
        C.convert(DATA / 'tf_2019_full64' / 'ckpt', img_size=256)


def test_cli_writes_a_loadable_checkpoint_and_fails_in_one_line(tmp_path, capsys):
    out = tmp_path / 'model.pt'
    assert C.main([str(DATA / 'tf_2019_full64' / 'ckpt' / 'UGATIT.model-1000'), str(out), '--smoothing', 'True']) == 0
    assert 'full model, ch 4, 64 px, TF graph 2019' in capsys.readouterr().out
    state = checkpoints.load_checkpoint(out)   # weights_only
    assert state['format'] == 'ugatit-pytorch/1' and state['step'] == 0
    assert {'genA2B', 'genB2A', 'disGA', 'disGB', 'disLA', 'disLB'} <= set(state)
    assert [p.name for p in tmp_path.iterdir()] == ['model.pt']   # atomic: no temporary left behind
    assert C.main([str(tmp_path / 'nothing'), str(tmp_path / 'x.pt')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: no TF checkpoint') and err.count('\n') == 1


@pytest.mark.parametrize('name', list(IMG_SIZE))
def test_convert_export_equals_convert_then_export(tmp_path, name):
    """--export writes what scripts/export.py writes from the converted file: the same weights, the
    same translations pixel for pixel, and a card that names the TF origin and its license."""
    from PIL import Image

    from scripts import export as export_cli
    size = ['--img_size', '64'] if IMG_SIZE[name] else []
    assert C.main([str(DATA / name / 'ckpt'), '--export', str(tmp_path / 'direct'), *size]) == 0
    assert C.main([str(DATA / name / 'ckpt'), str(tmp_path / 'converted.pt'), *size]) == 0
    assert export_cli.main(['--checkpoint', str(tmp_path / 'converted.pt'), '--out', str(tmp_path / 'two')]) == 0
    direct, two = (json.loads((tmp_path / f / 'config.json').read_text()) for f in ('direct', 'two'))
    assert {k: v for k, v in direct.items() if k != 'source'} == {k: v for k, v in two.items() if k != 'source'}
    assert direct['converted_from'] == 'ckpt/UGATIT.model-1000' and direct['converted_step'] == 1000
    outputs = {}
    for folder in ('direct', 'two'):
        assert main.main(['--phase', 'img_dir', '--img_dir', str(DATA / name / 'inputs' / 'testA'), '--checkpoint',
                          str(tmp_path / folder), '--out_dir', str(tmp_path / f'{folder}_A2B'), '--result_dir',
                          str(tmp_path / 'r'), '--device', 'cpu', '--num_workers', '0']) == 0
        outputs[folder] = {p.name: np.asarray(Image.open(p)) for p in sorted((tmp_path / f'{folder}_A2B').glob('*'))}
    assert outputs['direct'].keys() == outputs['two'].keys() and outputs['direct']
    assert all(np.array_equal(outputs['direct'][k], outputs['two'][k]) for k in outputs['direct'])
    card, card_two = ((tmp_path / f / 'README.md').read_text().replace((tmp_path / f).as_posix(), 'DIR')
                      for f in ('direct', 'two'))
    assert card == card_two   # the usage commands name each folder
    assert 'license: other' in card and 'github.com/taki0112/UGATIT' in card
    assert 'license and terms of the original release apply' in card and '- training step: 1000 (TensorFlow)' in card


def test_convert_export_and_output_exclude_each_other(tmp_path, capsys):
    ckpt = str(DATA / 'tf_2019_full64' / 'ckpt')
    for argv in ([ckpt], [ckpt, str(tmp_path / 'x.pt'), '--export', str(tmp_path / 'exp')],
                 [ckpt, str(tmp_path / 'x.pt'), '--license', 'mit']):
        assert C.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and err.count('\n') == 1
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# Training with --arch tf


@pytest.mark.parametrize('graph', ['current', '2019'])
def test_tf_arch_trains(tiny_dataset, tmp_path, graph):
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--arch', 'tf', '--n_res', '4', '--tf_graph', graph)
    assert isinstance(trainer.G['A2B'].cam, N.SharedCAM) and trainer.D['A']['G'].conv.bias is not None
    for step, batch in enumerate(random_batches(2), 1):
        logs = trainer.train_step(batch, step)
    assert all(torch.isfinite(v) for v in logs.values())
    rhos = torch.cat([m.rho.flatten() for m in trainer.G.modules() if hasattr(m, 'rho')])
    assert rhos.min() >= 0 and rhos.max() <= 1


def test_cli_rejects_tf_only_flags_under_pt_and_other_n_res(tiny_dataset, tmp_path, capsys):
    assert main.main(tiny_flags(tiny_dataset, tmp_path, '--smoothing', 'False')) == 2
    assert '--arch tf only' in capsys.readouterr().err
    assert main.main(tiny_flags(tiny_dataset, tmp_path, '--arch', 'tf')) == 2   # tiny flags have --n_res 1
    assert '--arch tf needs --n_res 4' in capsys.readouterr().err
    cfg = main.parse_args(tiny_flags(tiny_dataset, tmp_path, '--arch', 'tf', '--n_res', '4'))
    assert (cfg.arch.tf_graph, cfg.arch.smoothing) == ('current', True)
