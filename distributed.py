"""torchrun's processes: rank, world size and device, and the networks wrapped for DDP and torch.compile.

Every rank computes the same: identical initial weights (one seed), averaged gradients, hence
identical Adam updates, ρ clipping and EMA; ADA all-reduces its r_t counts; DDP broadcasts rank 0's
buffers (spectral norm's u, v) before each forward, before the power iteration runs on them.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


class DistributedContext:
    """Rank, world size and device of this process; torchrun sets the environment variables."""

    def __init__(self, device: str) -> None:
        self.world_size = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        self.enabled = self.world_size > 1
        if device.startswith('cuda') and self.enabled:
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(local_rank)
        self.device = torch.device(device)
        if self.enabled and not dist.is_initialized():
            dist.init_process_group('nccl' if self.device.type == 'cuda' else 'gloo')

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def agree_max(self, value: float, device: torch.device) -> int:
        """The largest of every rank's ``value`` (one all-reduce; the value itself without torchrun)."""
        if not self.enabled:
            return int(value)
        flag = torch.tensor([float(value)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def untrainable_parameters(D: nn.ModuleDict, cam_D_weight: float, regularisers: list | None = None
                           ) -> list[nn.Parameter]:
    """The discriminator parameters no loss term of the config reaches, for :func:`wrap_for_speed`.

    At ``--cam_D_weight`` <= 0 the losses drop D's CAM logits and ``build_critic`` switches CAM
    attention off, so the CAM FCs (PT's ``gap_fc``/``gmp_fc``, TF's ``cam``) produce nothing a loss
    reads -- except kernels one of ``regularisers`` covers (TF's L2 term: objects with ``.params``),
    which still get its gradient every step. Every other parameter of every config gets a gradient in
    each backward of its network (``tests/test_distributed.py`` checks the table of features).
    """
    if cam_D_weight > 0:
        return []
    regularised = {id(p) for term in regularisers or [] for p in term.params}
    return [p for critic in D.values() for net in critic.values() for name in ('gap_fc', 'gmp_fc', 'cam')
            if hasattr(net, name) for p in getattr(net, name).parameters() if id(p) not in regularised]


def _ddp(module: nn.Module, ids: list[int] | None, untrained: set[int]) -> nn.Module:
    """DDP over ``module``, leaving the parameters in ``untrained`` (ids) out of its gradient all-reduce.

    DDP's reducer waits for a gradient of every parameter it tracks in each backward; one that never
    comes makes the next forward fail ("Expected to have finished reduction in the prior iteration"),
    and ``find_unused_parameters`` is no way out: it walks the graph of each forward separately (G and
    the unstacked D run several forwards per backward) and breaks on parameters used outside forward
    (TF's L2 term). So what a config cannot train is left out, and a hook fails the step loudly should
    one of them get a gradient after all: it would not be averaged, and the ranks would drift apart.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP
    skipped = [(name, p) for name, p in module.named_parameters() if id(p) in untrained]
    for name, p in skipped:
        p.register_post_accumulate_grad_hook(_fail_on_gradient(name))
    DDP._set_params_and_buffers_to_ignore_for_model(module, [name for name, _ in skipped])
    return DDP(module, device_ids=ids)


def _fail_on_gradient(name: str):
    def hook(param: torch.Tensor) -> None:
        raise RuntimeError(f'{name} is left out of the DDP gradient all-reduce as untrainable under this config '
                           f'(distributed.untrainable_parameters), but it received a gradient: the rule is wrong')
    return hook


def wrap_for_speed(G: nn.ModuleDict, D: nn.ModuleDict, dist_ctx: DistributedContext, compile: bool,
                   untrained: list[nn.Parameter] | None = None, mode: str = 'default') -> tuple[dict, dict, dict]:
    """What the training step calls: the raw modules, in DDP wrappers (gradient all-reduce) under
    torchrun, and torch.compile'd with --compile. ``D`` is {domain: {scale: module}}. Returns
    (G, D, D for the generator step): the G step's critic needs no all-reduce of D's gradients
    (D is frozen then), so it is the compiled module without DDP.

    ``untrained`` (:func:`untrainable_parameters`) are the parameters no loss of the config reaches:
    DDP must not wait for their gradients. ``mode``: torch.compile's (``reduce-overhead``: CUDA graphs).
    """
    def compiled(module: nn.Module) -> nn.Module:
        return torch.compile(module, mode=mode)

    G_run = dict(G.items())
    D_local = {dom: dict(critic.items()) for dom, critic in D.items()}
    if compile:
        D_local = {dom: {s: compiled(m) for s, m in c.items()} for dom, c in D_local.items()}
    D_run = D_local
    if dist_ctx.enabled:
        ids = [dist_ctx.device.index] if dist_ctx.device.type == 'cuda' else None
        skip = {id(p) for p in untrained or []}
        G_run = {k: _ddp(m, ids, skip) for k, m in G_run.items()}
        D_run = {dom: {s: _ddp(m, ids, skip) for s, m in c.items()} for dom, c in D.items()}
        if compile:
            D_run = {dom: {s: compiled(m) for s, m in c.items()} for dom, c in D_run.items()}
    if compile:
        G_run = {k: compiled(m) for k, m in G_run.items()}
    return G_run, D_run, D_local
