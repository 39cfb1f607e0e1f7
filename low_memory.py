"""Opt-in lower-precision training state for small GPUs (``--optim_state``, ``--ema_dtype``). NOT exact.

The full model (``--light False``, 256 px) holds 671 M parameters, 537 M of them in the two
generators' first MLP FC. At the defaults (fp32 everywhere) nothing here runs and the training is
bit-for-bit what it was. The opt-ins:

* ``--optim_state 8bit|4bit``: Adam's two moments in blockwise-quantised 8 or 4 bits, through
  torchao's ``Adam8bit``/``Adam4bit`` (``torchao.optim``). Those are Adam with *coupled* L2 weight
  decay (grad + wd·θ, as ``torch.optim.Adam``), which is what PT's Adam is; bitsandbytes' 8-bit Adam
  applies decoupled (AdamW) decay, hence torchao. torchao quantises a tensor's moments only when it
  has at least 4096 values and a multiple of its block size (256 for 8 bits, 128 for 4 bits): the
  norms, biases and ρ stay fp32 (:func:`is_low_bit`).
* ``--ema_dtype bf16``: the EMA copies of the generators in bfloat16 (:class:`BF16EMA`).

Checkpoints stay loadable with ``torch.load(weights_only=True)`` without torchao installed: torchao's
state tensors are stored as plain tensors (:func:`encode_optimizer_state`) and rebuilt on resume.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Iterable

import torch
from torch import nn

import utils
from dataset import derive_seed
from errors import UserError

OPTIM_STATES = ('fp32', '8bit', '4bit')
EMA_DTYPES = ('fp32', 'bf16')
# torchao's block sizes (its Adam8bit/Adam4bit defaults) and minimum tensor size for quantised moments
BLOCK_SIZE = {'8bit': 256, '4bit': 128}
MIN_LOW_BIT_SIZE = 4096
_ENCODED = '__torchao_optim_state__'   # marks a torchao state tensor stored as plain tensors


def torchao_missing() -> bool:
    return importlib.util.find_spec('torchao') is None


def torchao_import_error() -> str | None:
    """None when torchao's optimizers import, else the first line of why not (a torch it was not built for)."""
    try:
        import torchao.optim  # noqa: F401
    except Exception as exc:   # noqa: BLE001 - any import failure is reported in one line
        return f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""}'
    return None


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) looks for: $CXX, else g++ (clang++ on macOS)."""
    return shutil.which(os.environ.get('CXX') or ('clang++' if sys.platform == 'darwin' else 'g++'))


def is_low_bit(param: torch.Tensor, optim_state: str) -> bool:
    """Whether torchao keeps this parameter's moments in low precision (its rule in
    ``_AdamBase._new_buffer``; tests check that it agrees with the optimizer's real state)."""
    if optim_state == 'fp32':
        return False
    return param.numel() >= MIN_LOW_BIT_SIZE and param.numel() % BLOCK_SIZE[optim_state] == 0


def low_bit_adam(params: Iterable[nn.Parameter], optim_state: str, lr: float, betas: tuple[float, float],
                 weight_decay: float) -> torch.optim.Optimizer:
    """torchao's Adam with 8- or 4-bit moments (coupled L2 weight decay, like torch.optim.Adam)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torchao.optim import Adam4bit, Adam8bit, subclass_4bit, subclass_8bit
    cls = {'8bit': Adam8bit, '4bit': Adam4bit}[optim_state]
    # torchao builds its code maps lazily from real values (.tolist()) and caches them: build them now,
    # outside the fake-tensor mode the memory estimate builds the optimizer under
    with unset_fake_temporarily():
        for module in (subclass_8bit, subclass_4bit):
            module.get_qmap_signed(), module.get_qmap_unsigned()
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, block_size=BLOCK_SIZE[optim_state])


def first_state(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> dict:
    """The state torchao's low-bit Adam creates for ``p`` on its first step (zero moments, step 0)."""
    return {'step': torch.tensor(0.0), 'exp_avg': optimizer._new_buffer(p, True),
            'exp_avg_sq': optimizer._new_buffer(p, False)}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """torchao keeps each group's lr as a tensor (a float there fails its step); torch's Adam a float."""
    for group in optimizer.param_groups:
        if isinstance(group['lr'], torch.Tensor):
            group['lr'].fill_(lr)
        else:
            group['lr'] = lr


# How a group's step runs on this machine, not training state: kept as built when a checkpoint is loaded
IMPLEMENTATION = ('foreach', 'fused', 'capturable')


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict``, keeping what the optimizer was built with for this machine and run:
    the kernel (a checkpoint's groups would otherwise bring back foreach from a CPU run, fused from a CUDA
    one) and the kind of learning rate: a tensor stays the same tensor (torchao's; the captured step of
    --cuda_graph reads its address), a float a float."""
    built = [{key: group[key] for key in ('lr', *IMPLEMENTATION) if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, before in zip(optimizer.param_groups, built):
        lr = before.pop('lr')
        if isinstance(lr, torch.Tensor):
            lr.fill_(group['lr'])
        else:
            lr = float(group['lr'])
        group.update(before, lr=lr)
        if 'fused' in group:   # torch's Adam: fused and capturable steps count on the device, others on the host
            _place_step_counts(optimizer, group)


def _place_step_counts(optimizer: torch.optim.Optimizer, group: dict) -> None:
    on_device = group['fused'] or group['capturable']
    for p in group['params']:
        state = optimizer.state.get(p, {})
        step = state.get('step')
        where = p.device if on_device else torch.device('cpu')
        if isinstance(step, torch.Tensor) and step.device != where:
            state['step'] = step.to(where, torch.float32)


def _state_classes() -> dict[str, type]:
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit
    return {cls.__name__: cls for cls in (OptimState8bit, OptimState4bit)}


def _is_torchao_state(value: object) -> bool:
    return type(value).__name__ in ('OptimState8bit', 'OptimState4bit') and type(value).__module__.startswith(
        'torchao.')


def encode_optimizer_state(state_dict: dict) -> dict:
    """An optimizer state dict whose torchao state tensors are plain tensors (codes, scales, map):
    loadable with ``weights_only=True`` without importing torchao, and not tied to its class layout.
    Returned unchanged (the same object) when it holds none, as at ``--optim_state fp32``."""
    if not any(_is_torchao_state(v) for s in state_dict['state'].values() for v in s.values()):
        return state_dict
    return {**state_dict, 'state': {index: {key: _encode(value) for key, value in s.items()}
                                    for index, s in state_dict['state'].items()}}


def _encode(value: object) -> object:
    if not _is_torchao_state(value):
        return value
    names, attributes = value.__tensor_flatten__()   # torch's tensor-subclass protocol
    return {_ENCODED: type(value).__name__, 'tensors': {n: getattr(value, n) for n in names},
            'attributes': [list(a) if isinstance(a, torch.Size) else a for a in attributes]}


def decode_optimizer_state(state_dict: dict) -> dict:
    """The inverse of :func:`encode_optimizer_state`."""
    if not any(isinstance(v, dict) and _ENCODED in v for s in state_dict['state'].values() for v in s.values()):
        return state_dict
    classes = _state_classes()

    def decode(value: object) -> object:
        if not (isinstance(value, dict) and _ENCODED in value):
            return value
        cls = classes[value[_ENCODED]]
        attributes = [torch.Size(a) if isinstance(a, list) else a for a in value['attributes']]
        return cls.__tensor_unflatten__(value['tensors'], attributes, None, None)
    return {**state_dict, 'state': {index: {key: decode(value) for key, value in s.items()}
                                    for index, s in state_dict['state'].items()}}


def check_resume(stored_values: dict, optim_state: str) -> None:
    """Moments are not converted between precisions: a one-line error when the checkpoint's (its
    recorded flags; none before this flag existed: fp32) differ from this run's."""
    stored = stored_values.get('optim_state', 'fp32')
    if stored != optim_state:
        raise UserError(f'the checkpoint holds {stored} Adam moments and --optim_state is {optim_state}: '
                        f'resume with --optim_state {stored} (moments are not converted between precisions)')


# ----------------------------------------------------------------------------------------------
# bfloat16 EMA


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 → bfloat16, rounding away from zero with probability (dropped low 16 bits) / 2¹⁶, so
    the result is unbiased. Round-to-nearest would freeze an EMA at β = 0.9999: each step moves it
    by 10⁻⁴ of its distance to the weights, far below half of bf16's 2⁻⁸ relative spacing."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536   # keep the top 16 bits (sign, exponent, 7)
    return bits.view(torch.float32).to(torch.bfloat16)


class BF16EMA(utils.EMA):
    """``utils.EMA`` with the copy in bfloat16 (half the memory; --ema_dtype bf16). Not exact: each
    update is computed in float32 from the bf16 copy and stochastically rounded back, from a
    generator reseeded from (seed, step), so a resumed run draws what an unbroken one does. Large
    tensors are updated in chunks of dim-0 slices so the float32 temporaries stay small."""

    CHUNK = 1 << 24   # values per chunk: 64 MB of float32 temporaries

    def __init__(self, model: nn.Module, beta: float, start_step: int, rampup: float | None = None,
                 seed: int = 0) -> None:
        super().__init__(model, beta, start_step, rampup)
        self.model.to(torch.bfloat16)
        self.seed = seed
        self._generator: torch.Generator | None = None

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        if step is not None:
            self.set_step(step)
        step = self.step
        beta = self.beta_at(step)
        device = next(self.model.parameters()).device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(derive_seed(self.seed, step))
        for ema, param in zip(self.model.parameters(), model.parameters()):
            target = param.detach()
            if ema.dim() == 0:   # slices below need a dim 0
                ema, target = ema.unsqueeze(0), target.unsqueeze(0)
            rows = max(1, self.CHUNK // max(1, target[0].numel()))
            for start in range(0, len(target), rows):
                part = ema[start:start + rows]
                if beta == 0.0:   # a plain copy: round to nearest
                    part.copy_(target[start:start + rows])
                else:
                    mixed = part.float().lerp_(target[start:start + rows].float(), 1.0 - beta)
                    part.copy_(stochastic_round_to_bf16(mixed, self._generator))
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)


# ----------------------------------------------------------------------------------------------
# What each option holds, for the README's savings (computed on the meta device)


def moment_bytes(params: Iterable[torch.Tensor], optim_state: str) -> int:
    """Bytes of Adam's two moments of ``params`` (torchao's state tensors, or fp32), built on meta."""
    total = 0
    classes = _state_classes() if optim_state != 'fp32' else {}
    for p in params:
        if not is_low_bit(p, optim_state):
            total += 2 * p.numel() * 4
            continue
        cls = classes['OptimState8bit' if optim_state == '8bit' else 'OptimState4bit']
        for signed in (True, False):
            state = cls.zeros(p.shape, signed, BLOCK_SIZE[optim_state], device='meta')
            total += sum(t.numel() * t.element_size() for t in (state.codes, state.scale, state.qmap))
    return total
