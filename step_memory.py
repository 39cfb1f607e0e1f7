"""Exact memory savings of the training step: what changes when memory is freed, never a number.

Its own module because these are mechanisms around the step rather than the step (``ugatit.py``) or
lower-precision state (``low_memory.py``, which changes the training): the generators' big MLP layers
updated inside the backward pass (:class:`EarlyUpdates`, with their gradient never formed whole where
it can be) and recomputed generator activations (:class:`Recomputed`). Each is tested bitwise against
the step without it (tests/test_early_updates.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import low_memory
from config import Config
from distributed import DistributedContext
from networks import ILN, FactoredGradLinear, GeneratorOutput, adaILN

# The largest slice of a factored gradient formed at once: 64 rows of the 256 × 1 M layer at 256 px with
# torch's Adam (fused on CUDA: no temporaries), 16 with torchao's, whose step makes about six float32
# temporaries of the slice. Slices are whole multiples of 16 rows, the row tile of the BLAS kernels:
# slices of 1 or 3 rows took other code paths and differed from the whole product in the last bit (MKL,
# torch 2.14); multiples of 16 match it.
CHUNK_BYTES = 256 * 2 ** 20
LOW_BIT_CHUNK_BYTES = 64 * 2 ** 20
ROW_TILE = 16


def build_early_updates(G: nn.ModuleDict, optimizer: torch.optim.Optimizer, config: Config,
                        dist: DistributedContext) -> EarlyUpdates:
    """Each generator's MLP input layer (268 M of the full model's 279 M parameters) updated inside the
    backward pass; none where that would not be exact (see :class:`EarlyUpdates`) or when switched off.
    In float32 without TF's L2 term the layer's gradient is never formed during the backward pass."""
    perf = config.performance
    exact = perf.amp != 'fp16' and not dist.enabled and not perf.compile
    layers = [g.FC[0] for g in G.values()] if perf.early_updates and exact else []
    # bf16 autocast runs the layer on a bf16 copy of the weight; TF's L2 term adds a gradient autograd forms
    factored = perf.amp == 'off' and not config.losses.kernel_l2
    return EarlyUpdates(optimizer, layers, factored=factored)


class EarlyUpdates:
    """Optimizer steps of chosen layers' weights inside the generator step's backward pass, so that their
    gradients (1 GiB per generator at 256 px) never wait for the rest of the backward pass, the
    optimizer step or the next D step.

    Two ways, both exact:

    - *factored* (float32): the layer (:class:`networks.FactoredGradLinear`) hands its weight gradient
      over as factors, ``grad.t() @ x`` per forward use, so no 1 GiB partial sum lives through the
      backward pass between a generator's two forward uses. When the backward pass ends the gradient is
      formed from them a slice of rows at a time (:data:`CHUNK_BYTES`) and each slice stepped at once: a slice of
      ``grad.t() @ x`` is the same product of the same rows (one BLAS call on fewer rows), the uses are
      summed in the order autograd sums them, and Adam's update is elementwise (torchao's low-bit moments
      are quantised in blocks within a row), so weights and moments are bitwise the whole step's.
    - *whole* (bf16 autocast, TF's L2 term): a post-accumulate hook steps the parameter the moment its
      summed gradient is complete, and frees it.

    The step is the optimizer's own (same class, hyperparameters and kernel, and the same state dict
    entries: moments and step counts are shared), run on the one tensor; the whole-optimizer step then
    skips the parameter (its grad is None). Not used where the update must wait for every gradient:
    fp16 (the GradScaler skips a step with any overflow), DDP (the gradient is averaged across ranks
    after the hook) and --compile (hooks inside a compiled graph); those step as before.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, layers: list[nn.Linear], *, factored: bool = True) -> None:
        self.optimizer = optimizer
        self.params = [layer.weight for layer in layers]
        # The group's index: load_state_dict (resume) replaces the group dicts, and the LR schedule sets
        # the new ones' lr.
        self._group = {p: next(i for i, g in enumerate(optimizer.param_groups) if any(q is p for q in g['params']))
                       for p in self.params}
        self._active = False
        self._factors: dict[nn.Parameter, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for layer in layers:
            if factored and isinstance(layer, FactoredGradLinear):
                layer.weight_grad_sink = self._collect
            else:
                layer.weight.register_post_accumulate_grad_hook(self._update_whole)

    @contextlib.contextmanager
    def during_backward(self) -> Iterator[None]:
        """Only the generator step's backward updates early (other backward passes, e.g. a reference
        step in the tests, leave the gradient for the optimizer as usual)."""
        self._active = True
        try:
            yield
            for p, factors in self._factors.items():
                self._update_factored(p, factors)
        finally:
            self._active = False
            self._factors = {}

    def _collect(self, weight: nn.Parameter, grad: torch.Tensor, x: torch.Tensor) -> None:
        """A forward use's weight-gradient factors, in the order autograd would sum them."""
        if self._active:
            self._factors.setdefault(weight, []).append((grad, x))
            return
        with torch.no_grad():   # any other backward pass: the gradient as autograd would accumulate it
            part = _gradient_rows([(grad, x)], slice(None))
            weight.grad = part if weight.grad is None else weight.grad.add_(part)

    @torch.no_grad()
    def _update_factored(self, p: nn.Parameter, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        state = self._state_of(p)
        most = CHUNK_BYTES if type(self.optimizer) is torch.optim.Adam else LOW_BIT_CHUNK_BYTES
        rows = max(1, most // (p[0].numel() * p.element_size()) // ROW_TILE) * ROW_TILE
        step = state['step']
        for start in range(0, len(p), rows):
            part = slice(start, start + rows)
            alias = nn.Parameter(p.detach()[part], requires_grad=False)   # shares the storage: steps ``p``
            alias.grad = _gradient_rows(factors, part)
            chunk = {'step': step.clone(), 'exp_avg': state['exp_avg'][part], 'exp_avg_sq': state['exp_avg_sq'][part]}
            self._alone(p, alias, {alias: chunk}).step()   # increments chunk['step'] in place
        step.copy_(chunk['step'])   # in place: a captured step (--cuda_graph) keeps reading this tensor

    @torch.no_grad()
    def _update_whole(self, p: nn.Parameter) -> None:
        if not self._active:
            return
        self._alone(p, p, self.optimizer.state).step()
        p.grad = None   # freed now; the whole-optimizer step skips a parameter without grad

    def _alone(self, p: nn.Parameter, param: nn.Parameter, state: dict) -> torch.optim.Optimizer:
        """The optimizer, stepping only ``param`` (``p`` or an alias of rows of it) with ``p``'s group's
        hyperparameters and ``state``: a shallow copy (torchao keeps its block size and flags as attributes;
        the group's lr, a tensor there, stays the one the LR schedule sets)."""
        single = object.__new__(type(self.optimizer))
        single.__dict__.update(self.optimizer.__dict__)
        single.param_groups = [{**self.optimizer.param_groups[self._group[p]], 'params': [param]}]
        single.state = state
        return single

    def _state_of(self, p: nn.Parameter) -> dict:
        """``p``'s optimizer state, created as the optimizer creates it on its first step, so that rows of it
        can be stepped (torchao's low-bit moments slice by rows too: a row is whole quantisation blocks)."""
        state = self.optimizer.state[p]
        if not state:
            if type(self.optimizer) is torch.optim.Adam:
                group = self.optimizer.param_groups[self._group[p]]
                on_device = group['fused'] or group['capturable']   # the step count on the device when fused
                state['step'] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                                 else torch.tensor(0.0, dtype=torch.get_default_dtype()))
                state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                state.update(low_memory.first_state(self.optimizer, p))
        return state


def _gradient_rows(factors: list[tuple[torch.Tensor, torch.Tensor]], rows: slice) -> torch.Tensor:
    """Rows of the weight gradient ``sum(g.t() @ x)``: each use's product as autograd forms it
    (``mm_mat2_backward``), summed as the engine sums a leaf's uses, ((u1 + u2) + u3) in arrival order."""
    total = None
    for g, x in factors:
        product = g.t()[rows].mm(x)
        total = product if total is None else total.add_(product)
    return total


class Recomputed(nn.Module):
    """A generator whose activations are recomputed during its backward pass instead of kept from the
    forward pass (activation checkpointing, ``--recompute``): the six generator passes of a step keep
    only their inputs while the D step runs. Exact: the same operations run again on the same inputs
    (the generators draw no random numbers)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        for norm in net.modules():   # and each norm's intermediates within it, from the norm's input
            if isinstance(norm, (ILN, adaILN)):
                norm.recompute = True

    def forward(self, x: torch.Tensor) -> GeneratorOutput:
        if not torch.is_grad_enabled():
            return self.net(x)
        # The generators draw no random numbers (tests/test_networks.py), so no RNG state is saved and restored
        # (neither may happen inside a captured step, --cuda_graph).
        return checkpoint(self.net, x, use_reentrant=False, preserve_rng_state=False)
