"""The training step captured whole and replayed as a CUDA graph (``--cuda_graph``).

At batch 1 the full model's step is launch-bound: some 7,000 kernels, each costing a launch and the
Python and dispatcher work in front of it, for a few milliseconds of arithmetic. A CUDA graph records
the kernels of one step once and replays them with a single launch.

Its own module because capturing is a mechanism around the step, apart from what the step computes
(``ugatit.py``) and from how it is laid out in memory (``step_memory.py``). The trainer splits each step
into host work done every step outside the graph (the learning rate and EMA decay written into device
scalars, the batch copied into static input buffers) and the device work, which reads only tensors and
is what gets captured: once per kind of step (generator steps and, with ``--n_critic`` > 1,
critic-only steps). The first :data:`WARMUP` steps of each kind run eagerly on a side stream (optimizer
state, cuDNN/cuBLAS workspaces and every lazily made buffer exist before the capture), the next one is
captured and replayed, every later one replayed.

A captured step may not read a device value on the host, nor depend on Python state that changes from
step to step: the replay runs the recorded kernels on the recorded addresses and no Python at all.
Without a GPU that cannot be tried, so :class:`EmulatedGraphs` replays a step the way a graph does:
it records the step's operations at the dispatcher during the capture and, at each replay, runs them
again on the same tensors (each fresh result written into the tensor recorded for it, as a graph
writes the same address), without running any Python. A value read on the host during the capture is
an error there, as on CUDA. The tests train with it and compare against the eager step.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from errors import CaptureError, UserError

# Eager steps of each kind before its capture: Adam creates its state on its first step, cuDNN picks its
# algorithms on the first calls, and PyTorch's recipe warms up on a side stream for a few iterations.
WARMUP = 3

Logs = dict[str, torch.Tensor]
DeviceStep = Callable[[dict[str, torch.Tensor], bool], Logs]

# Operations that hand a device value to the host (CUDA: a synchronisation, illegal while capturing) or
# whose output size depends on values. A CUDA tensor made from host data (``torch.tensor(x,
# device=cuda)``) is a blocking copy and illegal while capturing too: its op is ``lift_fresh``.
HOST_READS = frozenset({
    'aten::_local_scalar_dense', 'aten::is_nonzero', 'aten::equal', 'aten::nonzero', 'aten::masked_select',
    'aten::_unique2', 'aten::unique_dim', 'aten::unique_consecutive', 'aten::lift_fresh',
})


class GraphBackend(Protocol):
    """How steps are captured and replayed on a device."""

    capture_runs_step: bool   # does the capture itself compute the step (else the first replay does)?

    def warmup(self) -> contextlib.AbstractContextManager: ...
    def capture(self, step: Callable[[], Logs]) -> tuple[Callable[[], None], Logs]: ...


class CudaGraphs:
    """``torch.cuda.CUDAGraph`` captures sharing one memory pool (the kinds never run at once, and
    nothing one graph frees is read by the other: what lives on is held by the parameters, the
    optimizers or the returned losses). ``thread_local`` capture: the data loader's pin-memory thread
    keeps making CUDA calls while the step is captured."""

    capture_runs_step = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side), warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='This instance was constructed with capturable=True')
            yield
        current.wait_stream(self.side)

    def capture(self, step: Callable[[], Logs]) -> tuple[Callable[[], None], Logs]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode='thread_local'):
            logs = step()
        return graph.replay, logs


class EmulatedGraphs:
    """CUDA graph semantics on any device (see the module docstring): what the tests train with."""

    capture_runs_step = True

    def warmup(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def capture(self, step: Callable[[], Logs]) -> tuple[Callable[[], None], Logs]:
        recording = _Recording()
        with recording:
            logs = step()
        return recording.replay, logs


class _Recording(TorchDispatchMode):
    """Every operation below autograd (forward, backward, optimizer, EMA) with its arguments and results."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in HOST_READS or _masks(func, args):
            raise CaptureError(f'{func._schema.name} inside the captured step: it reads a device value on the host '
                               '(or copies host data to the device), which a CUDA graph cannot replay')
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out

    @torch.no_grad()
    def replay(self) -> None:
        for func, args, kwargs, recorded in self.calls:
            fresh = func(*args, **kwargs)
            for old, new in zip(tree_leaves(recorded), tree_leaves(fresh)):
                if isinstance(old, torch.Tensor) and not _same_memory(old, new):
                    old.copy_(new)   # a graph writes each result where the capture put it


def _masks(func, args: tuple) -> bool:
    """Indexing with a boolean mask (``t[t > 0]``): the result's size depends on the values."""
    if func._schema.name not in ('aten::index', 'aten::index_put', 'aten::index_put_'):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """In-place results and views are their inputs' memory again: nothing to write back."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.data_ptr() == b.data_ptr()


# The graph backend of each device type (--cuda_graph is refused on the others). The tests add 'cpu':
# EmulatedGraphs.
BACKENDS: dict[str, Callable[[torch.device], GraphBackend]] = {'cuda': CudaGraphs}


def backend_for(device: torch.device) -> GraphBackend | None:
    make = BACKENDS.get(device.type)
    return make(device) if make is not None else None


class CapturedStep:
    """The trainer's device step behind static inputs: eager warm-up, one capture per kind, replays.

    ``prepare`` moves a loader batch to the device in the step's layout; its first result becomes the
    static input buffers, which every later batch is copied into (it must have the same keys and shapes).
    :meth:`reset` drops the graphs (after the state's tensors were replaced, as a checkpoint load does).
    """

    def __init__(self, backend: GraphBackend, step: DeviceStep,
                 prepare: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
        self.backend = backend
        self.step = step
        self.prepare = prepare
        self.inputs: dict[str, torch.Tensor] | None = None
        self.graphs: dict[bool, tuple[Callable[[], None], Logs]] = {}
        self.eager_steps: Counter[bool] = Counter()

    def __call__(self, batch: dict[str, torch.Tensor], generator_step: bool) -> Logs:
        self._load(batch)
        if generator_step in self.graphs:
            replay, logs = self.graphs[generator_step]
            replay()
            return logs
        if self.eager_steps[generator_step] < WARMUP:
            self.eager_steps[generator_step] += 1
            with self.backend.warmup():
                return self.step(self.inputs, generator_step)
        replay, logs = self.backend.capture(lambda: self.step(self.inputs, generator_step))
        self.graphs[generator_step] = (replay, logs)
        if not self.backend.capture_runs_step:
            replay()
        return logs

    def reset(self) -> None:
        self.graphs.clear()
        self.eager_steps.clear()

    def _load(self, batch: dict[str, torch.Tensor]) -> None:
        if self.inputs is None:   # owned buffers (on the CPU ``prepare`` may hand back the batch itself)
            self.inputs = {key: value.clone() for key, value in self.prepare(batch).items()}
            return
        if batch.keys() != self.inputs.keys():
            raise UserError(f'--cuda_graph: a batch with {sorted(batch)} after batches with {sorted(self.inputs)}; '
                            'a captured step needs the same inputs every step')
        for key, static in self.inputs.items():
            if batch[key].shape != static.shape:
                raise UserError(f'--cuda_graph: batch {key!r} has shape {tuple(batch[key].shape)}, the captured step '
                                f'{tuple(static.shape)}; a captured step needs batches of one shape')
            static.copy_(batch[key], non_blocking=True)
