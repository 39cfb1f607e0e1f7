"""Peak GPU memory of a training configuration, estimated on the CPU by tracking tensor storage at the dispatcher.

The training step runs under a ``TorchDispatchMode`` that sees every op's outputs and, through a weak
reference on each new storage, the moment that storage is freed. That gives the sequence of
allocations and frees of a few whole training steps (D step, G step, both backwards, the optimizer
steps, the EMA update), which is replayed through a model of the device's allocator to find the peak.
The parts at that moment come from identity: the trainer's parameters and buffers (weights), their
``.grad`` (gradients), the optimizers' state (optimizer), the EMA copies (ema) and everything else
(activations: saved tensors, temporaries, the batch, autocast's weight copies).

:func:`estimate` builds and runs an unmodified trainer on fake tensors (``FakeTensorMode``: shapes and
dtypes, no data), so the full model takes seconds and no memory. :func:`measure` tracks a training
run that already exists, on real or fake tensors. The fake tensors stay on the CPU (the autograd engine
asks the CUDA driver about the device of every backward, so a fake 'cuda' device needs a GPU), and
what CUDA does differently in memory is modelled instead (``cuda_emulation``: the caching
allocator's block sizes, autocast's CUDA cast policy, fused Adam).

Like every module below the trainer, this one is handed what it needs, not the trainer: a
:class:`Training` (the networks, optimizers and EMA copies, and a callable for one step), or for
:func:`estimate` a function that builds one from a config. A start-up check would read::

    report = memory.estimate(cfg, build=lambda cfg: UGATIT(cfg).memory_training())
    print(report.summary())   # 'peak 17.23 GiB at step 2 (weights 2.50, gradients 2.34, ...)'
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import random
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from config import Config
from cuda_emulation import Allocator, CudaCachingAllocator, ExactAllocator, cuda_autocast_policy, use_fused_adam

GiB = 1024 ** 3
PARTS = ('weights', 'gradients', 'optimizer', 'ema', 'activations')


# ----------------------------------------------------------------------------------------------
# The report


@dataclass
class MemoryReport:
    """The peak of live tensor storage over the tracked steps and its parts at that moment (bytes).

    ``peak_bytes`` is what ``torch.cuda.max_memory_allocated`` counts for the tracked steps when the
    allocator model is CUDA's: block sizes as the caching allocator hands them out. It excludes
    memory the allocator never sees (the CUDA context, cuBLAS/cuDNN library state) and the
    workspaces cuBLAS/cuDNN allocate inside a single kernel call.
    """

    peak_bytes: int
    parts: dict[str, int]
    peak_step: int                                        # the step (1-based) whose op set the peak
    peak_op: str                                          # the aten op that allocated last before it
    ops_per_step: list[int] = field(default_factory=list)
    device: str = 'cuda'                                  # whose allocator the bytes are counted by

    def summary(self) -> str:
        """One line, in GiB: 'peak 12.34 GiB at step 2 (weights 2.29, gradients ...)'."""
        parts = ', '.join(f'{name} {value / GiB:.2f}' for name, value in self.parts.items())
        return f'peak {self.peak_bytes / GiB:.2f} GiB at step {self.peak_step} ({parts})'


# ----------------------------------------------------------------------------------------------
# What a training run holds


@dataclass
class TrainingParts:
    """The long-lived tensors of a training run, by what they are."""

    networks: list[nn.Module]                             # trained: parameters, buffers, gradients
    optimizers: list[torch.optim.Optimizer]
    ema: list[nn.Module] = field(default_factory=list)    # averaged copies of networks


@dataclass
class Training:
    """What is measured: the run's long-lived tensors and one training step, ``step(batch, number)``."""

    parts: TrainingParts
    step: Callable[[dict[str, torch.Tensor], int], object]


def _module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Parameters and buffers in the order ``Module.to`` moves them (children first), which is the
    order they reach the GPU in."""
    for child in module.children():
        yield from _module_tensors(child)
    yield from (t for t in module._parameters.values() if t is not None)
    yield from (t for t in module._buffers.values() if t is not None)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


# ----------------------------------------------------------------------------------------------
# Tracking storage at the dispatcher


class StorageTracker(TorchDispatchMode):
    """Records every storage the ops create and the moment each is freed, as a list of events.

    A storage is identified by a serial number (ids of freed objects are reused). ``events`` holds
    +serial for an allocation, -serial for a free and 0 for nothing (an event taken back), in
    program order; ``roles`` holds the part a storage was seen to play (sticky: a gradient buffer
    stays a gradient until freed).

    One correction makes fake tensors behave like real ones: when a tensor feeds several ops, the
    autograd engine sums its gradients in place on real tensors (``old.add_(new)``) but out of place
    on tensor subclasses such as fake tensors (``old + new``, then ``old`` is freed). An ``add`` in
    backward whose first operand dies straight after is therefore booked as that operand, reused.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[int] = []
        self.sizes: dict[int, int] = {}
        self.roles: dict[int, str] = {}
        self.ops = 0
        self.op_names: dict[int, str] = {}                # event index -> op that allocated there
        self.step_starts: list[tuple[int, int]] = []      # (event index, step)
        self._serials: dict[int, int] = {}                # id(storage) -> serial, while alive
        self._refs: dict[int, weakref.ref] = {}           # id(storage) -> weak reference with the free callback
        self._aliases: dict[int, int] = {}                # serial booked as another (in-place accumulation)
        self._pending: tuple[int, int, int, weakref.ref, int] | None = None
        self._next = 1
        self._op = 'setup'

    def track(self, tensor: torch.Tensor, role: str | None = None) -> int:
        """Follow ``tensor``'s storage (from now on; once); ``role`` labels it. Returns its serial. A
        wrapper subclass (torchao's low-bit optimizer state) holds no data itself: its inner tensors
        (codes, scales) are followed instead."""
        if is_traceable_wrapper_subclass(tensor):
            inner = [self.track(getattr(tensor, name), role) for name in tensor.__tensor_flatten__()[0]]
            return inner[0]
        storage = tensor.untyped_storage()
        serial = self._serials.get(id(storage))
        if serial is None:
            serial = self._next
            self._next += 1
            self._serials[id(storage)] = serial
            self._refs[id(storage)] = weakref.ref(storage, self._freed_callback(id(storage), serial))
            self.sizes[serial] = storage.nbytes()
            self._record(serial)
        elif storage.nbytes() != self.sizes[serial]:   # grown in place (resize_, out= kernels)
            self.events.append(-serial)
            self.sizes[serial] = storage.nbytes()
            self._record(serial)
        if role is not None:
            self.roles[serial] = role
        return serial

    def _record(self, serial: int) -> None:
        self.op_names[len(self.events)] = self._op
        self.events.append(serial)

    def _freed_callback(self, key: int, serial: int) -> Callable[[weakref.ref], None]:
        def freed(_ref: weakref.ref) -> None:
            self._serials.pop(key, None)
            self._refs.pop(key, None)
            self.events.append(-self._aliases.get(serial, serial))
        return freed

    def start_step(self, step: int) -> None:
        self.settle()
        self.step_starts.append((len(self.events), step))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.settle()
        self.ops += _counts(func)
        self._op = str(func)
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        if func is torch.ops.aten.add.Tensor and _accumulates_gradient(args, kwargs, out):
            result, operand = out.untyped_storage(), args[0].untyped_storage()
            self._pending = (id(result), self._serials[id(result)], self._serials[id(operand)], weakref.ref(operand),
                             len(self.events) - 1)
        return out

    def settle(self) -> None:
        """Book the last gradient accumulation in place if its first operand is gone."""
        if self._pending is None:
            return
        key, out, operand, operand_ref, alloc_index = self._pending
        self._pending = None
        if operand_ref() is not None or self.events[alloc_index] != out or self._serials.get(key) != out:
            return
        free_index = next(i for i in range(len(self.events) - 1, alloc_index, -1) if self.events[i] == -operand)
        self.events[alloc_index] = self.events[free_index] = 0
        self._aliases[out] = operand
        self._serials[key] = operand


def _accumulates_gradient(args: tuple, kwargs: dict | None, out: object) -> bool:
    """``old + new`` as the autograd engine sums two gradients (in backward, without grad mode)."""
    return (torch._C._current_graph_task_id() != -1 and not torch.is_grad_enabled() and not kwargs
            and len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args)
            and isinstance(out, torch.Tensor) and args[0].shape == out.shape and args[0].dtype == out.dtype
            and args[0].is_contiguous() and args[0].untyped_storage().nbytes() == out.untyped_storage().nbytes())


def _counts(func: torch._ops.OpOverload) -> int:
    """1 for an op, 0 for a ``prim`` metadata query (fake tensors dispatch ``prim.device`` for
    every ``.device`` read; real ones do not)."""
    return 0 if func.namespace == 'prim' else 1


class OpCounter(TorchDispatchMode):
    """Counts the ops that reach the dispatcher (after autograd, so backward ops count too)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += _counts(func)
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    """The number of ops one call of ``fn`` dispatches (forward, backward, optimizer: all of them)."""
    with OpCounter() as counter:
        fn()
    return counter.count


# ----------------------------------------------------------------------------------------------
# From events to the report


def _label_parts(tracker: StorageTracker, parts: TrainingParts) -> None:
    """Label the long-lived storages that exist now (weights, EMA, optimizer state, gradients)."""
    for net in parts.networks:
        for t in _module_tensors(net):
            tracker.track(t, 'weights')
            if t.grad is not None:
                tracker.track(t.grad, 'gradients')
    for model in parts.ema:
        for t in _module_tensors(model):
            tracker.track(t, 'ema')
    for optimizer in parts.optimizers:
        for t in _optimizer_tensors(optimizer):
            tracker.track(t, 'optimizer')


@contextlib.contextmanager
def _labelling_hooks(tracker: StorageTracker, parts: TrainingParts) -> Iterator[None]:
    """Label gradients when autograd stores them and optimizer state after each optimizer step."""
    def on_grad(param: torch.Tensor) -> None:
        if param.grad is not None:   # an earlier hook may have used and dropped it
            tracker.track(param.grad, 'gradients')

    def on_step(optimizer: torch.optim.Optimizer, *_: object) -> None:
        for t in _optimizer_tensors(optimizer):
            tracker.track(t, 'optimizer')

    handles = [p.register_post_accumulate_grad_hook(on_grad)
               for net in parts.networks for p in net.parameters() if p.requires_grad]
    handles += [optimizer.register_step_post_hook(on_step) for optimizer in parts.optimizers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _replay(tracker: StorageTracker, allocator: Allocator, stop: int | None = None) -> tuple[int, int, dict[int, int]]:
    """Run the events (up to index ``stop``) through the allocator: (peak bytes, its event index, the
    charged bytes of each storage alive at the end)."""
    current = peak = 0
    peak_index = -1
    live: dict[int, int] = {}
    for index, event in enumerate(tracker.events[:None if stop is None else stop + 1]):
        if event == 0:
            continue
        if event > 0:
            live[event] = allocator.allocate(event, tracker.sizes[event])
            current += live[event]
        else:
            current -= allocator.free(-event)
            live.pop(-event, None)
        if current > peak:
            peak, peak_index = current, index
    return peak, peak_index, live


def _report(tracker: StorageTracker, new_allocator: Callable[[], Allocator], device: str,
            ops_per_step: list[int]) -> MemoryReport:
    """The peak of the events replayed through the allocator model, and its parts at that moment."""
    peak, peak_index, _ = _replay(tracker, new_allocator())
    _, _, live = _replay(tracker, new_allocator(), stop=peak_index)
    parts = dict.fromkeys(PARTS, 0)
    for serial, nbytes in live.items():
        parts[tracker.roles.get(serial, 'activations')] += nbytes
    step = max((s for start, s in tracker.step_starts if start <= peak_index), default=0)
    op = tracker.op_names.get(max((i for i in tracker.op_names if i <= peak_index), default=0), '?')
    return MemoryReport(peak, parts, step, op, ops_per_step, device)


def measure(training: Training, batches: Iterable[dict[str, torch.Tensor]], *, first_step: int = 1,
            device: str = 'cpu') -> MemoryReport:
    """Track ``training.step(batch, step)`` over the batches, steps ``first_step``, ``first_step + 1``, ...

    Everything alive when called counts: the networks, EMA copies and optimizer state by part, and
    the batches as activations. ``device`` picks the allocator model ('cuda': CUDA's caching
    allocator; otherwise exact bytes).
    """
    parts = training.parts
    new_allocator = CudaCachingAllocator if device.startswith('cuda') else ExactAllocator
    tracker = StorageTracker()
    _label_parts(tracker, parts)
    ops_per_step = []
    with _labelling_hooks(tracker, parts):
        for step, batch in enumerate(batches, start=first_step):
            for value in batch.values():
                tracker.track(value)
            tracker.start_step(step)
            before = tracker.ops
            with tracker:
                training.step(batch, step)
            tracker.settle()
            ops_per_step.append(tracker.ops - before)
    return _report(tracker, new_allocator, device, ops_per_step)


# ----------------------------------------------------------------------------------------------
# Estimating on fake tensors


def estimate(config: Config, build: Callable[[Config], Training], *, device: str | None = None,
             steps: int | None = None) -> MemoryReport:
    """Peak memory of training ``config`` on ``device`` (default: the config's), from fake tensors.

    ``build(cfg)`` makes the trainer and describes it as a :class:`Training`; the trainer then runs
    unmodified on fake CPU tensors, on CUDA with fused Adam and autocast's CUDA cast policy (as it is
    built there). ``steps`` defaults to ``n_critic + 1``: step 1 creates Adam's moments at its very
    end, so only later steps show the steady state (the first G step after it and one whole critic
    cycle). The estimate is of one process's eager step: ``--compile`` is ignored (``--cuda_graph``
    too: the graph's private pool holds about the step's own peak), and under torchrun
    DDP's gradient buckets (about the size of the gradients) come on top. The global random
    generators are left as they were (building a trainer seeds them).
    """
    device = device or config.performance.device
    config = dataclasses.replace(config, performance=dataclasses.replace(config.performance, device='cpu',
                                                                         compile=False, cuda_graph=False))
    steps = steps or config.schedule.n_critic + 1
    on_cuda = device.startswith('cuda')
    # torch.compile'd code (torchao's low-bit Adam step) runs eagerly: the dispatcher sees every op, and
    # its temporaries count as the uncompiled step's (an upper bound for the fused kernels)
    with torch.compiler.set_stance('force_eager'), \
            FakeTensorMode(allow_non_fake_inputs=True), _fake_construction(), _rng_untouched(), \
            mock.patch.dict(os.environ, {'WORLD_SIZE': '1', 'RANK': '0', 'LOCAL_RANK': '0'}), \
            cuda_autocast_policy() if on_cuda else contextlib.nullcontext():
        training = build(config)
        if on_cuda:
            use_fused_adam(training.parts.optimizers)
        arch = config.arch
        shape = (config.schedule.batch_size, arch.img_ch, arch.img_size, arch.img_size)
        batches = [{domain: torch.empty(shape) for domain in 'AB'} for _ in range(2)]   # as the benchmark holds them
        return measure(training, (batches[i % 2] for i in range(steps)), device=device)


@contextlib.contextmanager
def assume_cuda() -> Iterator[None]:
    """Let config validation accept CUDA settings (``--device cuda``, ``--amp fp16``) on a machine
    without a GPU, to estimate for one: validation asks ``torch.cuda.is_available()``."""
    with mock.patch.object(torch.cuda, 'is_available', lambda: True):
        yield


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's generators afterwards (CUDA's once initialised; before,
    seeding CUDA is only queued, and the real trainer's own seeding comes later)."""
    python, numpy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


def _convert_floats(module: nn.Module, dtype: torch.dtype) -> None:
    """``Module.to(dtype)`` for fake tensors, whose parameters cannot be swapped in place: new ones."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_floating_point():
                m._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)


@contextlib.contextmanager
def _fake_construction() -> Iterator[None]:
    """What an unmodified trainer needs to be built on fake tensors: ``Module.to`` leaves a module
    of fake tensors where it is (swapping fake parameters fails, and the estimate's tensors are
    already on the device it models; a layout change costs no bytes; a dtype change is made), and ``deepcopy`` (the EMA
    copies) keeps the copies in the same fake mode."""
    original_to = nn.Module.to

    def to(module: nn.Module, *args, **kwargs) -> nn.Module:
        if any(isinstance(t, FakeTensor) for t in itertools.chain(module.parameters(), module.buffers())):
            dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
            if dtype is not None:   # a dtype change does cost bytes (--ema_dtype bf16)
                _convert_floats(module, dtype)
            return module
        return original_to(module, *args, **kwargs)

    with mock.patch.object(nn.Module, 'to', to), \
            mock.patch.object(FakeTensorMode, '__deepcopy__', lambda mode, memo: mode, create=True), \
            warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Accessing the data pointer of FakeTensor')   # Tensor.__deepcopy__
        yield
