"""Shared fixtures: a tiny two-domain dataset and the flags of a tiny model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_domain(folder: Path, n: int, size: int, colour: tuple[int, int, int], seed: int) -> None:
    """n noisy images around one colour, so the domains differ."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise = rng.integers(-40, 40, size=(size, size, 3))
        array = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f'img{i}.png')


def make_dataset(root: Path, counts: tuple[int, int, int, int] = (6, 5, 3, 2)) -> Path:
    """trainA/trainB/testA/testB with the given image counts: warm A, cool B (40 px)."""
    colours = {'A': (200, 80, 60), 'B': (60, 90, 200)}
    for seed, (split, n) in enumerate(zip(('trainA', 'trainB', 'testA', 'testB'), counts)):
        make_domain(root / split, n, 40, colours[split[-1]], seed)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / 'tiny')


def tiny_flags(dataset: Path, result_dir: Path, *extra: str) -> list[str]:
    """A 32-px light model with 4/3-layer discriminators: a step takes a few tens of ms on a CPU."""
    return ['--dataset', str(dataset), '--result_dir', str(result_dir), '--device', 'cpu',
            '--light', 'True', '--ch', '4', '--n_res', '1', '--img_size', '32',
            '--n_global_dis', '4', '--n_local_dis', '3', '--num_workers', '0',
            '--print_freq', '1000', '--log_freq', '1', '--latest_freq', '0', *extra]


def tiny_trainer(dataset: Path, tmp_path: Path, *extra: str):
    """A UGATIT trainer built through main.py's flags for the tiny model (a 10-step schedule)."""
    import main
    from ugatit import UGATIT
    return UGATIT(main.parse_args(tiny_flags(dataset, tmp_path / 'out', '--iteration', '10', *extra)))


def train_stream(trainer):
    """The training batches of ``trainer``'s config from step 1 (what its run would feed it)."""
    import dataset as data
    config = trainer.config
    return data.train_stream(data.resolve_dataset_root(config.run.dataset), config.data, 1, trainer.dist)


def run_training(trainer) -> None:
    """The training run of ``trainer``'s config (training_loop), as main.py starts it."""
    import training_loop
    training_loop.TrainingRun(trainer, trainer.config).run()


@pytest.fixture
def one_torch_thread():
    """One intra-op thread (as the subprocesses' OMP_NUM_THREADS=1): on a shared 2-core machine two
    spinning threads made a run 30x slower."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_checkpoint(tmp_path_factory, name: str) -> Path:
    """A 2-step tiny light model's checkpoint (translates any size with --keep_size)."""
    import main
    tmp = tmp_path_factory.mktemp(name)
    root = make_dataset(tmp / 'tiny', (2, 2, 1, 1))
    assert main.main(tiny_flags(root, tmp / 'out', '--iteration', '2', '--save_freq', '2')) == 0
    return tmp / 'out' / 'tiny' / 'model' / 'tiny_params_0000002.pt'


def record_gradients(module) -> dict:
    """name -> the gradient each parameter of ``module`` receives in the next backward passes (the step
    frees gradients after its optimizer steps, and updates the big MLP layers inside the backward). In
    float32 those layers' weight gradients are never formed (step_memory.EarlyUpdates: the hook sees
    None), so they are not recorded."""
    seen: dict = {}

    def record(grad, name: str) -> None:
        if grad is not None:
            seen[name] = grad.detach().clone()
    for name, p in module.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda grad, name=name: record(grad, name))
    return seen


def random_batches(n: int, batch: int = 2, size: int = 32, seed: int = 123) -> list[dict]:
    """n batches of uniform images in [-1, 1] for both domains, from a seeded generator."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return [{dom: torch.rand(batch, 3, size, size, generator=g) * 2 - 1 for dom in 'AB'} for _ in range(n)]


@pytest.fixture(scope='module')
def face_weight_files(tmp_path_factory) -> dict[str, Path]:
    """Random FaceNet and BiSeNet weights in files, loaded through the flags as real weights would be."""
    import torch
    from facenet_pytorch import InceptionResnetV1

    from faceseg import BiSeNet
    folder = tmp_path_factory.mktemp('face_weights')
    torch.manual_seed(0)
    files = {'facenet': folder / 'facenet.pt', 'bisenet': folder / '79999_iter.pth'}
    torch.save(InceptionResnetV1(classify=False).state_dict(), files['facenet'])
    torch.save(BiSeNet(19).state_dict(), files['bisenet'])
    return files


def assert_bitwise(a: object, b: object, where: str = '') -> None:
    """Nested dicts/lists of tensors and plain values, bit for bit (dtypes too)."""
    import torch
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f'{where}[{i}]')
    else:
        assert a == b, where


def assert_same_weights(a: dict, b: dict) -> None:
    """Two training checkpoints hold bit-identical networks (EMA copies included) at the same step."""
    import torch
    for key in ('genA2B', 'genB2A', 'disGA', 'disGB', 'disLA', 'disLB', 'genA2B_ema', 'genB2A_ema'):
        for name, value in a[key].items():
            torch.testing.assert_close(value, b[key][name], rtol=0, atol=0, msg=f'{key}.{name}')
    assert a['step'] == b['step']


def signal_after_step(monkeypatch, step: int, signum: int) -> None:
    """Send ``signum`` to this process right after training step ``step`` (what a scheduler does)."""
    import os

    from ugatit import UGATIT
    original = UGATIT.train_step

    def train_step(self, batch, current):
        logs = original(self, batch, current)
        if current == step:
            os.kill(os.getpid(), signum)
        return logs
    monkeypatch.setattr(UGATIT, 'train_step', train_step)
