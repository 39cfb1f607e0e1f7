"""Exports: safetensors folders that translate exactly as the checkpoint did, and ONNX graphs that
onnxruntime runs to PyTorch's numbers (light and full, with and without EN's architecture options)."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

import checkpoints
import errors
import utils
from inference.onnx import export_onnx
from model import DIRECTIONS, ArchConfig
from networks import ResnetGenerator

# A tiny version of each architecture family the exporter must handle.
ARCHS = {
    'light': dict(light=True),
    'full': dict(light=False),
    'light_en': dict(light=True, use_se=True, attention_gan=2, attention_input=True),
    'full_en': dict(light=False, use_se=True, attention_gan=3, use_deconv=True),
}


def tiny_arch(**options) -> ArchConfig:
    return ArchConfig(**{**dict(light=True, ch=4, n_res=1, img_size=32), **options})


def tiny_generator(arch: ArchConfig, seed: int = 0) -> ResnetGenerator:
    torch.manual_seed(seed)
    net = ResnetGenerator(3, 3, ngf=arch.ch, n_blocks=arch.n_res, img_size=arch.img_size, light=arch.light,
                          use_se=arch.use_se, attention_gan=arch.attention_gan,
                          attention_input=arch.attention_input, use_deconv=arch.use_deconv)
    with torch.no_grad():   # move rho off its init so that both AdaLIN mixes matter
        for module in net.modules():
            if hasattr(module, 'rho'):
                module.rho.uniform_(0, 1)
    return net.eval()


def images(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize('name', list(ARCHS))
def test_onnx_matches_pytorch(tmp_path, name):
    ort = pytest.importorskip('onnxruntime', reason='ONNX tests need onnxruntime (pip install -r '
                              'requirements-extras.txt)')
    pytest.importorskip('onnxscript', reason='ONNX export needs onnxscript (requirements-extras.txt)')
    arch = tiny_arch(**ARCHS[name])
    net = tiny_generator(arch)
    paths = export_onnx(net, tmp_path / 'A2B.onnx', arch)
    assert paths == [tmp_path / 'A2B.onnx'] and not (tmp_path / 'A2B.onnx.data').exists()   # self-contained
    path = paths[0]
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    assert [i.name for i in session.get_inputs()] == ['image']
    assert [o.name for o in session.get_outputs()] == ['translation', 'heatmap']
    batch, _, height, width = session.get_inputs()[0].shape
    assert isinstance(batch, str)   # a named dynamic dimension
    # H and W are dynamic for PT's light model only; others keep img_size (the MLP input depends on it).
    dynamic = arch.light is True
    assert (isinstance(height, str) and isinstance(width, str)) if dynamic else (height, width) == (32, 32)
    # Batch sizes other than the example's; light models also at other sizes (multiples of 4).
    shapes = [(1, 3, 32, 32), (3, 3, 32, 32)]
    if arch.light is True:
        shapes += [(2, 3, 48, 40), (1, 3, 20, 64)]
    for shape in shapes:
        x = images(*shape)
        with torch.no_grad():
            ref = net(x)
        translation, heatmap = session.run(None, {'image': x.numpy()})
        assert translation.shape == shape and heatmap.shape == (shape[0], 1, shape[2] // 4, shape[3] // 4)
        assert np.abs(translation - ref.image.numpy()).max() <= 1e-4
        assert np.abs(heatmap - ref.heatmap.numpy()).max() <= 1e-4 * max(1.0, float(ref.heatmap.abs().max()))


@pytest.mark.parametrize('fp16', [False, True])
def test_export_folder_round_trip(tmp_path, fp16):
    pytest.importorskip('safetensors')
    arch = tiny_arch(light=False, use_se=True)
    nets = {'A2B': tiny_generator(arch, 0), 'B2A': tiny_generator(arch, 1)}
    paths = checkpoints.write_export(nets, arch, tmp_path / 'export', fp16=fp16, metadata={'step': 7, 'ema': True})
    assert sorted(p.name for p in paths) == ['A2B.safetensors', 'B2A.safetensors', 'config.json']
    config = json.loads((tmp_path / 'export' / 'config.json').read_text())
    assert config['format'] == checkpoints.EXPORT_FORMAT and config['step'] == 7
    assert config['dtype'] == ('float16' if fp16 else 'float32')
    assert ArchConfig.from_dict(config) == arch
    assert checkpoints.is_export(tmp_path / 'export') and not checkpoints.is_export(tmp_path)

    state = checkpoints.read_export(tmp_path / 'export')
    x = images(2, 3, 32, 32)
    for d in DIRECTIONS:
        rebuilt = tiny_generator(arch, seed=99)
        rebuilt.load_state_dict(state[d.key], strict=True)
        assert all(t.dtype == torch.float32 for t in state[d.key].values())
        with torch.no_grad():
            diff = (rebuilt(x).image - nets[d.name](x).image).abs().max().item()
        # float16 weights: ~3 significant digits per weight; the translation stays within a few 8-bit levels
        assert diff <= (3e-2 if fp16 else 0.0)
        if fp16:
            assert diff > 0   # the weights really were rounded


def test_fp16_export_is_half_the_size(tmp_path):
    pytest.importorskip('safetensors')
    arch = tiny_arch(light=False, ch=8)
    nets = {d.name: tiny_generator(arch) for d in DIRECTIONS}
    full = checkpoints.write_export(nets, arch, tmp_path / 'f32')[1].stat().st_size
    half = checkpoints.write_export(nets, arch, tmp_path / 'f16', fp16=True)[1].stat().st_size
    n_params = sum(t.numel() for t in nets['A2B'].state_dict().values())
    assert n_params * 4 <= full < n_params * 4 + 20000 and n_params * 2 <= half < n_params * 2 + 20000


@pytest.mark.parametrize('umask,mode', [(0o022, 0o644), (0o002, 0o664)])
def test_export_files_follow_the_umask(tmp_path, umask, mode):
    """safetensors writes its files 0600; the export gives them the permission of its other files."""
    pytest.importorskip('safetensors')
    arch = tiny_arch()
    nets = {d.name: tiny_generator(arch) for d in DIRECTIONS}
    old = os.umask(umask)
    try:
        paths = checkpoints.write_export(nets, arch, tmp_path / 'export')
        assert os.umask(umask) == umask   # the umask is left as it was
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths} == {
        'config.json': mode, 'A2B.safetensors': mode, 'B2A.safetensors': mode}


def test_read_export_errors_are_one_line(tmp_path):
    (tmp_path / 'config.json').write_text('{"format": "something-else"}')
    with pytest.raises(errors.UserError, match='not a U-GAT-IT export'):
        checkpoints.read_export(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps({'format': checkpoints.EXPORT_FORMAT}))
    with pytest.raises(errors.UserError, match='A2B.safetensors'):
        checkpoints.read_export(tmp_path)


def test_file_report_gives_size_and_sha256(tmp_path):
    import hashlib
    path = tmp_path / 'x.bin'
    path.write_bytes(b'u-gat-it' * 1000)
    line = utils.file_report([path])[0]
    assert line.split()[0] == 'x.bin' and '8.00 KB' in line
    assert line.endswith(hashlib.sha256(b'u-gat-it' * 1000).hexdigest())
