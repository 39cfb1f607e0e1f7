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

from config import Config
from distributed import DistributedContext
from networks import ILN, FactoredGradLinear, GeneratorOutput, adaILN

# The largest slice of a factored gradient formed at once: 64 rows of the 256 × 1 M layer at 256 px.
CHUNK_BYTES = 256 * 2 ** 20


def build_early_updates(G: nn.ModuleDict, optimizer: torch.optim.Adam, config: Config, dist: DistributedContext
                        ) -> EarlyUpdates:
    """Each generator's MLP input layer (268 M of the full model's 279 M parameters) updated inside the
    backward pass; none where that would not be exact (see :class:`EarlyUpdates`) or when switched off.
    In float32 without TF's L2 term the layer's gradient is never formed whole (factored)."""
    perf = config.performance
    # torch's own Adam only (--optim_state 8bit/4bit step in torchao's, whose moments are small anyway)
    exact = perf.amp != 'fp16' and not dist.enabled and not perf.compile and type(optimizer) is torch.optim.Adam
    layers = [g.FC[0] for g in G.values()] if perf.early_updates and exact else []
    # bf16 autocast runs the layer on a bf16 copy of the weight; TF's L2 term adds a gradient autograd forms
    factored = perf.amp == 'off' and not config.losses.kernel_l2
    return EarlyUpdates(optimizer, layers, factored=factored)


class EarlyUpdates:
    """Adam steps of chosen layers' weights inside the generator step's backward pass, so that their
    gradients (1 GiB per generator at 256 px) never wait for the rest of the backward pass, the
    optimizer step or the next D step.

    Two ways, both exact:

    - *factored* (float32): the layer (:class:`networks.FactoredGradLinear`) hands its weight gradient
      over as factors, ``grad.t() @ x`` per forward use; when the backward pass ends, the gradient is
      formed :data:`CHUNK_BYTES` rows at a time and each slice takes its Adam step at once. A slice of
      ``grad.t() @ x`` is the same product of the same rows (one BLAS call on fewer rows), and the uses
      are summed in the order autograd sums them, so the gradient is bitwise autograd's; Adam's update
      is elementwise, so its steps on the slices are bitwise its step on the whole tensor. No 1 GiB
      partial sum lives through the backward pass between a generator's two forward uses.
    - *whole* (bf16 autocast, TF's L2 term): a post-accumulate hook steps the parameter the moment its
      summed gradient is complete, and frees it.

    The step is the optimizer's own Adam (same hyperparameters, same foreach/fused kernel, the same
    state dict entries: moments and step counts are shared); the whole-optimizer step then skips the
    parameter (its grad is None). Not used where the update must wait for every gradient: fp16 (the
    GradScaler skips a step with any overflow), DDP (the gradient is averaged across ranks after the
    hook), --compile (hooks inside a compiled graph) and torchao's low-bit Adam; those step as before.
    """

    def __init__(self, optimizer: torch.optim.Adam, layers: list[nn.Linear], *, factored: bool = True) -> None:
        self.optimizer = optimizer
        self.params = [layer.weight for layer in layers]
        # The group's index: load_state_dict (resume) replaces the group dicts, and the LR schedule sets
        # the new ones' lr.
        self._group = {p: next(i for i, g in enumerate(optimizer.param_groups) if any(q is p for q in g['params']))
                       for p in self.params}
        self._alone = torch.optim.Adam([nn.Parameter(torch.zeros(1))], **optimizer.defaults)   # steps one tensor
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
            part = grad.t().mm(x)
            weight.grad = part if weight.grad is None else weight.grad.add_(part)

    @torch.no_grad()
    def _update_factored(self, p: nn.Parameter, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        state = self._state_of(p)
        rows = max(1, CHUNK_BYTES // (p[0].numel() * p.element_size()))
        step = state['step']
        for start in range(0, len(p), rows):
            part = slice(start, start + rows)
            grad = None
            for g, x in factors:   # ((u1 + u2) + u3): the engine's left fold, in arrival order
                rows_grad = g.t()[part].mm(x)
                grad = rows_grad if grad is None else grad.add_(rows_grad)
            chunk_state = {'step': step.clone(), 'exp_avg': state['exp_avg'][part],
                           'exp_avg_sq': state['exp_avg_sq'][part]}
            self._step_one(p, p.detach()[part], grad, chunk_state)
        state['step'] = chunk_state['step']

    @torch.no_grad()
    def _update_whole(self, p: nn.Parameter) -> None:
        if not self._active:
            return
        self._step_one(p, p.detach(), p.grad, self._state_of(p))
        p.grad = None   # freed now; the whole-optimizer step skips a parameter without grad

    def _state_of(self, p: nn.Parameter) -> dict:
        """``p``'s Adam state, created as ``torch.optim.Adam`` creates it on its first step (the step
        count on the device when fused)."""
        state = self.optimizer.state[p]
        if not state:
            group = self.optimizer.param_groups[self._group[p]]
            on_device = group['fused'] or group['capturable']
            state['step'] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                             else torch.tensor(0.0, dtype=torch.get_default_dtype()))
            state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _step_one(self, p: nn.Parameter, values: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        """The optimizer's Adam step of ``values`` (``p`` or rows of it) with ``p``'s group's hyperparameters."""
        alias = nn.Parameter(values, requires_grad=False)   # shares the storage: the step updates ``p``
        alias.grad = grad
        single = self._alone
        single.param_groups[0].update({k: v for k, v in self.optimizer.param_groups[self._group[p]].items()
                                       if k != 'params'}, params=[alias])
        single.state = {alias: state}   # its moments are views of (or are) ``p``'s: updated in place
        single.step()   # increments state['step'] in place
        single.state, single.param_groups[0]['params'], alias.grad = {}, [], None   # keep no slice alive


class Recomputed(nn.Module):
    """A generator whose activations are recomputed during its backward pass instead of kept from the
    forward pass (activation checkpointing, ``--recompute``): the six generator passes of a step keep
    only their inputs while the D step runs. Exact: the same operations run again on the same inputs
    (the generators draw no random numbers; the RNG state is restored for the recomputation anyway)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        for norm in net.modules():   # and each norm's intermediates within it, from the norm's input
            if isinstance(norm, (ILN, adaILN)):
                norm.recompute = True

    def forward(self, x: torch.Tensor) -> GeneratorOutput:
        if not torch.is_grad_enabled():
            return self.net(x)
        return checkpoint(self.net, x, use_reentrant=False)
