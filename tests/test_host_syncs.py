"""No host<->device synchronisation inside a training step, for every optional feature (issue 16).

On CUDA the host waits for the GPU whenever Python reads a tensor's value (``.item()``, ``float()``,
``int()``, ``bool()``/``if t:``, ``.cpu()``, ``.tolist()``, ``.numpy()``), whenever an op's output
shape depends on values (boolean-mask indexing, ``nonzero``, ``unique``, ...), and whenever a
blocking host->device copy is made (``torch.tensor(data, device=cuda)``, ``torch.as_tensor(3.0,
device=cuda)``, list indices, ``.to(device)`` of a host constant). One such call per step is enough
to stall the GPU queue every step.

These tests run on the CPU, where none of that costs anything, so they count the calls that *would*
sync instead: the test patches each of them (pytest's monkeypatch) and records the calls made
directly from the project's own files during a training step. Calls made inside torch's own code
(e.g. the CPU optimizer's ``step.item()``, absent from CUDA's fused Adam) are not counted. Host
tensors are tracked by where they come from: tensors the project builds from Python or numpy data
without a device (and the tensor constants of its modules) count as host tensors until moved.

Each feature runs one warm-up cycle first (one-time uploads of cached constants are allowed), then
the counted cycle: ``--n_critic`` steps, so a generator step and, where there are some, critic-only
steps, plus ``LossMeter.add`` as the loop calls it every step. Logging (``LossMeter.flush``) is the
one place meant to sync and is outside the counted window.
"""
from __future__ import annotations

import contextlib
import linecache
import sys
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_dataset, make_domain, tiny_flags, train_stream
from torch.overrides import TorchFunctionMode

import augment
import main
import training_loop
from ugatit import UGATIT

PROJECT = Path(augment.__file__).resolve().parent
_PROJECT_PREFIX = str(PROJECT) + '/'

# Tensor methods that read values on the host.
VALUE_READS = ('item', 'tolist', 'numpy', 'cpu', '__float__', '__int__', '__bool__', '__index__',
               '__complex__', '__array__', '__format__', '__contains__')
# Ops whose output shape depends on tensor values (the host must learn the size).
DATA_DEPENDENT = ('nonzero', 'argwhere', 'masked_select', 'unique', 'unique_consecutive', 'equal')


def _is_project_file(path: str) -> bool:
    return path.startswith(_PROJECT_PREFIX) and 'site-packages' not in path and 'dist-packages' not in path


def _holds_tensors(data: object) -> bool:
    if isinstance(data, (list, tuple)):
        return any(isinstance(d, torch.Tensor) or _holds_tensors(d) for d in data)
    return False


def _project_constants() -> dict[int, torch.Tensor]:
    """Tensors held at module or class level by the project's modules (host constants)."""
    found: dict[int, torch.Tensor] = {}
    for module in list(sys.modules.values()):
        path = getattr(module, '__file__', None) or ''
        if not _is_project_file(str(Path(path).resolve())):
            continue
        for value in vars(module).values():
            items = vars(value).values() if isinstance(value, type) else [value]
            for item in items:
                candidates = item if isinstance(item, (tuple, list)) else [item]
                for c in candidates:
                    if isinstance(c, torch.Tensor):
                        found[id(c)] = c
    return found


class SyncCounter:
    """Patches every Python-level call that syncs on CUDA and records the project's own calls.

    Use ``tracking()`` around construction (marks the host tensors the project builds) and
    ``counting()`` around the steps; ``found`` lists 'what at file:line: source' per call.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.found: list[str] = []
        self._active = False   # True: record calls; False: only track host tensors
        self._host: dict[int, weakref.ref] = {}
        self._constants = _project_constants()
        self._install(monkeypatch)

    # -- bookkeeping -------------------------------------------------------------------------

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        self._active = True
        try:
            with _IndexWatch(self):
                yield
        finally:
            self._active = False

    def _note(self, what: str, frame: types.FrameType) -> None:
        path = frame.f_code.co_filename
        if self._active and _is_project_file(path) and frame.f_code is not _MODE_CODE:
            line = linecache.getline(path, frame.f_lineno).strip()
            self.found.append(f'{what} at {Path(path).relative_to(PROJECT)}:{frame.f_lineno}: {line}')

    def _mark_host(self, tensor: object, frame: types.FrameType) -> None:
        if isinstance(tensor, torch.Tensor) and _is_project_file(frame.f_code.co_filename):
            self._host[id(tensor)] = weakref.ref(tensor)

    def is_host(self, tensor: object) -> bool:
        if not isinstance(tensor, torch.Tensor):
            return False
        ref = self._host.get(id(tensor))
        return id(tensor) in self._constants or (ref is not None and ref() is tensor)

    # -- the patches -------------------------------------------------------------------------

    def _install(self, mp: pytest.MonkeyPatch) -> None:
        counter = self

        def reader(name: str) -> Callable:
            original = getattr(torch.Tensor, name)

            def wrapper(tensor, *args, **kwargs):
                counter._note(f'Tensor.{name}', sys._getframe(1))
                return original(tensor, *args, **kwargs)
            return wrapper

        for name in VALUE_READS:
            mp.setattr(torch.Tensor, name, reader(name))
        for name in DATA_DEPENDENT:
            if hasattr(torch.Tensor, name):
                mp.setattr(torch.Tensor, name, reader(name))
            if hasattr(torch, name):
                mp.setattr(torch, name, self._function(getattr(torch, name), f'torch.{name}'))
        mp.setattr(torch.Tensor, 'cuda', reader('cuda'))

        where, repeat_interleave = torch.where, torch.repeat_interleave

        def where_wrapper(condition, *args, **kwargs):
            if not args and not kwargs:   # torch.where(cond) is nonzero(cond, as_tuple=True)
                counter._note('torch.where(condition)', sys._getframe(1))
            return where(condition, *args, **kwargs)

        def repeat_interleave_wrapper(inp, repeats=None, dim=None, *, output_size=None):
            if output_size is None and (isinstance(repeats, torch.Tensor) or repeats is None):
                counter._note('torch.repeat_interleave without output_size', sys._getframe(1))
            return repeat_interleave(inp, repeats, dim, output_size=output_size)

        mp.setattr(torch, 'where', where_wrapper)
        mp.setattr(torch, 'repeat_interleave', repeat_interleave_wrapper)

        tensor_fn, as_tensor_fn, from_numpy = torch.tensor, torch.as_tensor, torch.from_numpy

        def construct(what: str, fn: Callable, data, *args, **kwargs):
            frame = sys._getframe(2)
            device = kwargs.get('device', args[1] if len(args) > 1 else None)
            out = fn(data, *args, **kwargs)
            if isinstance(data, torch.Tensor):
                if counter.is_host(data):
                    if device is not None:
                        counter._note(f'{what}(host tensor, device=...)', frame)
                    else:
                        counter._mark_host(out, frame)
            elif _holds_tensors(data):
                counter._note(f'{what}(a sequence of tensors) reads each one', frame)
            elif device is not None:
                counter._note(f'{what}(Python data, device=...)', frame)
            else:
                counter._mark_host(out, frame)
            return out

        mp.setattr(torch, 'tensor', lambda data, *a, **k: construct('torch.tensor', tensor_fn, data, *a, **k))
        mp.setattr(torch, 'as_tensor', lambda data, *a, **k: construct('torch.as_tensor', as_tensor_fn, data, *a, **k))

        def from_numpy_wrapper(array):
            out = from_numpy(array)
            counter._mark_host(out, sys._getframe(1))
            return out

        mp.setattr(torch, 'from_numpy', from_numpy_wrapper)

        to, copy_, new_tensor = torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.new_tensor

        def to_wrapper(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
            out = to(tensor, *args, **kwargs)
            if counter.is_host(tensor):
                if device is None:
                    counter._mark_host(out, frame)   # a dtype change stays on the host
                elif counter._active and not non_blocking:
                    counter._note('.to(device) of a host tensor (blocking copy)', frame)
                elif not counter._active and id(tensor) not in counter._constants:
                    counter._host.pop(id(tensor), None)   # moved at construction: on CPU the same object
            return out

        def copy_wrapper(tensor, src, non_blocking=False):
            if counter.is_host(src) and not counter.is_host(tensor) and not non_blocking:
                counter._note('.copy_(host tensor) (blocking copy)', sys._getframe(1))
            return copy_(tensor, src, non_blocking)

        def new_tensor_wrapper(tensor, data, *args, **kwargs):
            if not isinstance(data, torch.Tensor) or counter.is_host(data):
                counter._note('Tensor.new_tensor(Python data)', sys._getframe(1))
            return new_tensor(tensor, data, *args, **kwargs)

        mp.setattr(torch.Tensor, 'to', to_wrapper)
        mp.setattr(torch.Tensor, 'copy_', copy_wrapper)
        mp.setattr(torch.Tensor, 'new_tensor', new_tensor_wrapper)

    def _function(self, fn: Callable, what: str) -> Callable:
        def wrapper(*args, **kwargs):
            self._note(what, sys._getframe(1))
            return fn(*args, **kwargs)
        return wrapper


class _IndexWatch(TorchFunctionMode):
    """Indexing syncs, seen through a function mode: patching ``Tensor.__getitem__`` on the class
    would leave tensors looking like Python sequences for the rest of the session."""

    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def _issues(self, index) -> list[str]:
        issues = []
        for i in index if isinstance(index, tuple) else (index,):
            if isinstance(i, (list, np.ndarray)):
                issues.append('a list/array index (copied to the device)')
            elif isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                issues.append('a boolean-mask index (data-dependent shape)')
            elif self.counter.is_host(i):
                issues.append('a host index tensor (copied to the device)')
        return issues

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ or func is torch.Tensor.__setitem__:
            issues = self._issues(args[1])
            if func is torch.Tensor.__setitem__ and self.counter.is_host(args[2]) and args[2].dim() > 0:
                issues.append('a host tensor value (copied to the device)')
            what = 'indexing' if func is torch.Tensor.__getitem__ else 'index assignment'
            for issue in issues:
                self.counter._note(f'{what} with {issue}', sys._getframe(1))
        return func(*args, **kwargs)


_MODE_CODE = _IndexWatch.__torch_function__.__code__   # re-calls the patched methods: not a call site


@pytest.fixture
def syncs(monkeypatch) -> SyncCounter:
    return SyncCounter(monkeypatch)


# ----------------------------------------------------------------------------------------------
# The counter itself: each kind of sync is seen, sync-free code is not


HOST_CONSTANT = torch.tensor([1.0, 2.0, 3.0])


def _x() -> torch.Tensor:
    return torch.linspace(-1, 1, 6)


SYNCING = {
    'item': lambda x: x[0].item(),
    'float': lambda x: float(x.sum()),
    'int': lambda x: int(x[0]),
    'bool': lambda x: bool(x.sum() > 0),
    'if': lambda x: 1 if x.max() > 0 else 0,
    'cpu': lambda x: x.cpu(),
    'tolist': lambda x: x.tolist(),
    'numpy': lambda x: x.numpy(),
    'np.asarray': lambda x: np.asarray(x),
    'f-string': lambda x: f'{x.sum():.3f}',
    'tensor(device=)': lambda x: torch.tensor([1.0, 2.0], device=x.device),
    'as_tensor(scalar, device=)': lambda x: torch.as_tensor(0.5, dtype=x.dtype, device=x.device),
    'tensor(list of tensors)': lambda x: torch.tensor([x[0], x[1]]),
    'new_tensor': lambda x: x.new_tensor([1.0]),
    'constant.to(device)': lambda x: HOST_CONSTANT.to(x.device) * x[:3],
    'built.to(device)': lambda x: torch.tensor([1.0, 2.0]).to(x.device, x.dtype),
    'numpy.to(device)': lambda x: torch.from_numpy(np.ones(2)).to(x.device),
    'list index': lambda x: x[[0, 2]],
    'mask index': lambda x: x[x > 0],
    'mask assignment': lambda x: x.clone().__setitem__(x > 0, 0.0),
    'nonzero': lambda x: x.nonzero(),
    'torch.where(cond)': lambda x: torch.where(x > 0),
    'unique': lambda x: torch.unique(x),
    'masked_select': lambda x: x.masked_select(x > 0),
}


@pytest.mark.parametrize('name', list(SYNCING))
def test_counter_sees_each_kind_of_sync(syncs, name):
    x = _x()
    with syncs.counting():
        SYNCING[name](x)
    assert len(syncs.found) == 1, syncs.found
    assert 'test_host_syncs.py' in syncs.found[0]


def _deliberate_item(x: torch.Tensor) -> float:
    return x.sum().item()


def test_counter_sees_a_deliberate_item_call_once_per_call(syncs):
    x = _x()
    with syncs.counting():
        for _ in range(3):
            _deliberate_item(x)
    assert len(syncs.found) == 3 and all('_deliberate_item' not in f and '.item()' in f for f in syncs.found)
    _deliberate_item(x)   # outside the window: not counted
    assert len(syncs.found) == 3


def test_counter_ignores_sync_free_code_and_torch_internals(syncs):
    x = _x()
    with syncs.counting():
        y = torch.where(x > 0, x, torch.full_like(x, 2.0)) * 3.0 + x.new_full((6,), 0.5)
        y = torch.stack([y, torch.zeros_like(y)]).to(x.device, non_blocking=True)
        y[0] = y[1] * 2
        y = y.to(torch.float64) + torch.as_tensor(y)
        optim = torch.optim.Adam([torch.nn.Parameter(x.clone())], foreach=True)
        optim.param_groups[0]['params'][0].grad = y[0].float()
        optim.step()   # CPU Adam reads its step counter with .item(): torch's code, not counted
    assert syncs.found == []


# ----------------------------------------------------------------------------------------------
# One training step of every optional feature


@pytest.fixture(scope='module')
def face_weights(face_weight_files) -> dict[str, Path]:
    return face_weight_files


@dataclass(frozen=True)
class Feature:
    flags: tuple[str, ...] = ()
    data: str = 'plain'            # 'plain' or 'grouped' (trainA/0, trainA/1, ...)


SEG = ('--faceseg_weights', '{bisenet}')
GROUPS = ('--group', '0,1')
FEATURES = {
    'baseline': Feature(),
    'ada': Feature(('--ada', 'True', '--ada_p', '0.5', '--ada_interval', '1')),
    'ada_wgan_gp': Feature(('--ada', 'True', '--ada_p', '0.5', '--ada_interval', '1', '--gan_type', 'wgan-gp')),
    'grouploss': Feature((*GROUPS, '--use_grouploss', 'True'), data='grouped'),
    'selective_backprop': Feature((*GROUPS, '--use_grouploss', 'True', '--selective_backprop', 'True'),
                                  data='grouped'),
    'faceseg': Feature((*SEG, '--seg_fix_weight', '1', '--seg_D_mask', 'True', '--seg_G_detach', 'True',
                        '--seg_fix_glass_mouth', 'True')),
    'faceseg_cam_masks_hard_edge': Feature((*SEG, '--seg_D_cam_inp_mask', 'True', '--seg_D_cam_fea_mask', 'True',
                                            '--hard_seg_edge', 'True', '--tv_weight', '1')),
    'facenet': Feature(('--face_distance_weight', '0.5', '--facenet_weights', '{facenet}')),
    'ema': Feature(('--ema', 'True', '--ema_start', '0')),
    'ema_bf16': Feature(('--ema', 'True', '--ema_start', '0', '--ema_dtype', 'bf16')),
    'n_critic_2': Feature(('--n_critic', '2')),
    'wgan_gp': Feature(('--gan_type', 'wgan-gp')),
    'dragan': Feature(('--gan_type', 'dragan')),
    'arch_tf': Feature(('--arch', 'tf', '--n_res', '4')),
    'match_histograms': Feature(('--match_histograms', 'True', '--aug_prob', '1')),
    'has_blur': Feature(('--has_blur', 'True')),
    'paired': Feature(('--paired', 'True', '--pair_weight', '1')),
    'enhanced_architecture': Feature(('--use_se', 'True', '--attention_gan', '2', '--attention_input', 'True',
                                      '--cam_D_weight', '-1', '--cam_D_attention', 'False', '--light', '4')),
    'amp_bf16_channels_last': Feature(('--amp', 'bf16', '--channels_last', 'True')),
    'unstacked_batches': Feature(('--stack_batches', 'False')),
}


def _grouped_dataset(root: Path) -> Path:
    for g, colour in enumerate([(200, 60, 60), (60, 200, 60)]):
        for split, n, seed in (('trainA', 3, g), ('trainB', 3, 10 + g), ('testA', 1, 20 + g), ('testB', 1, 30 + g)):
            make_domain(root / split / str(g), n, 40, colour if split.endswith('A') else colour[::-1], seed)
    return root


@pytest.mark.parametrize('name', list(FEATURES))
def test_training_step_makes_no_host_sync(name, tmp_path, request, syncs):
    feature = FEATURES[name]
    flags = list(feature.flags)
    if any('{' in f for f in flags):
        weights = request.getfixturevalue('face_weights')
        flags = [f.format(**{k: str(v) for k, v in weights.items()}) for f in flags]
    if feature.data == 'grouped':
        dataset = _grouped_dataset(tmp_path / 'grouped')
    else:
        dataset = make_dataset(tmp_path / 'tiny', (4, 4, 2, 2))   # paired by file name as well
    trainer = UGATIT(main.parse_args(tiny_flags(dataset, tmp_path / 'out', '--iteration', '10',
                                                '--batch_size', '2', '--ema', 'False', *flags)))
    cycle = trainer.schedule.n_critic
    stream = train_stream(trainer)
    batches = [next(stream) for _ in range(2 * cycle)]
    meter = training_loop.LossMeter()
    for step in range(1, cycle + 1):   # warm-up: one-time constant uploads are allowed
        meter.add(trainer.train_step(batches[step - 1], step))
    with syncs.counting():
        for step in range(cycle + 1, 2 * cycle + 1):
            meter.add(trainer.train_step(batches[step - 1], step))
    assert syncs.found == [], f'{len(syncs.found)} host syncs in one training cycle:\n' + '\n'.join(syncs.found)
    assert all(np.isfinite(v) for v in meter.flush().values())   # logging: the one allowed sync
