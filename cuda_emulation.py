"""What a CUDA training step does differently from a CPU one in memory, modelled on the CPU.

Three things change the bytes a step holds on a GPU and can be reproduced without one:

- **The caching allocator** (:class:`CudaCachingAllocator`): ``torch.cuda.max_memory_allocated``
  is the peak of the allocator's ``allocated_bytes``, which adds the size of the *block* handed
  out, not the size asked for. Modelled from c10/cuda/CUDACachingAllocator.cpp with default
  settings (no ``PYTORCH_CUDA_ALLOC_CONF``: no expandable segments, no power-of-two rounding, no
  split limit), one stream, no OOM retries:

  - a request is rounded up to a multiple of 512 bytes (``round_size``; 0 bytes allocate nothing);
  - requests up to 1 MiB come from a small pool of 2 MiB segments, larger ones from a large pool;
    a request that no free block fits gets a new segment: 2 MiB (small), 20 MiB (1-10 MiB
    requests), otherwise the request rounded up to 2 MiB (``get_allocation_size``);
  - the smallest free block that fits is used (best fit, lowest address first among equals); it
    is split when the rest is at least 512 bytes (small pool) or more than 1 MiB (large pool),
    otherwise the whole block is handed out and counted (``should_split``);
  - a freed block merges with free neighbours of its segment; segments are never released (the
    benchmark empties the cache only before it measures).

- **Autocast's cast policy** (:func:`cuda_autocast_policy`): CUDA and CPU autocast cast different
  ops (the CPU runs reflection padding in float32, CUDA runs nearest upsampling and sums in
  float32, ...). Inside the context, CPU autocast follows CUDA's op lists (ATen's
  autocast_mode.h, torch 2.x), so activations get the dtypes they have on a GPU.

- **Fused Adam** (:func:`use_fused_adam`): the trainer picks fused Adam on CUDA (no temporaries)
  and foreach Adam on the CPU (temporaries as large as the parameters).
"""
from __future__ import annotations

import bisect
import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils._pytree import tree_leaves, tree_map

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20          # largest "small" request
SMALL_BUFFER = 2 << 20        # small-pool segment
MIN_LARGE_ALLOC = 10 << 20    # requests below this share 20 MiB segments
LARGE_BUFFER = 20 << 20
ROUND_LARGE = 2 << 20


# ----------------------------------------------------------------------------------------------
# The caching allocator


class Allocator(Protocol):
    """What a storage of ``nbytes`` costs on a device, given the allocations before it."""

    def allocate(self, key: int, nbytes: int) -> int: ...
    def free(self, key: int) -> int: ...


class ExactAllocator:
    """Bytes as asked (the CPU: what the tensors hold)."""

    def __init__(self) -> None:
        self._sizes: dict[int, int] = {}

    def allocate(self, key: int, nbytes: int) -> int:
        self._sizes[key] = nbytes
        return nbytes

    def free(self, key: int) -> int:
        return self._sizes.pop(key)


def round_size(nbytes: int) -> int:
    """The caching allocator's request rounding (512-byte multiples, at least 512)."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def allocation_size(rounded: int) -> int:
    """The size of a new segment for a rounded request."""
    if rounded <= SMALL_SIZE:
        return SMALL_BUFFER
    if rounded < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-rounded // ROUND_LARGE) * ROUND_LARGE


def should_split(rest: int, small: bool) -> bool:
    """Whether the part of a block beyond the request becomes a free block of its own."""
    return rest >= MIN_BLOCK if small else rest > SMALL_SIZE


@dataclass(eq=False)
class Block:
    """A piece of a segment: [address, address + size); neighbours within the same segment."""

    address: int
    size: int
    small: bool
    prev: Block | None = None
    next: Block | None = None
    allocated: bool = False

    def key(self) -> tuple[int, int]:
        return (self.size, self.address)


class CudaCachingAllocator:
    """Block sizes as the caching allocator hands them out (see the module docstring)."""

    def __init__(self) -> None:
        self._free: dict[bool, list[tuple[int, int]]] = {True: [], False: []}   # small? -> sorted keys
        self._blocks: dict[tuple[int, int], Block] = {}
        self._allocated: dict[int, Block] = {}
        self._end = 0   # next segment address (segments never overlap)

    def allocate(self, key: int, nbytes: int) -> int:
        if nbytes == 0:
            return 0
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._take_free(size, small) or self._new_segment(allocation_size(size), small)
        rest = block.size - size
        if should_split(rest, small):
            remainder = Block(block.address + size, rest, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = remainder
            block.next, block.size = remainder, size
            self._insert_free(remainder)
        block.allocated = True
        self._allocated[key] = block
        return block.size

    def free(self, key: int) -> int:
        block = self._allocated.pop(key, None)
        if block is None:   # a 0-byte storage
            return 0
        charged = block.size
        block.allocated = False
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._remove_free(neighbour)
                block = self._merge(block, neighbour)
        self._insert_free(block)
        return charged

    def _take_free(self, size: int, small: bool) -> Block | None:
        pool = self._free[small]
        index = bisect.bisect_left(pool, (size, -1))
        if index == len(pool):
            return None
        return self._blocks.pop(pool.pop(index))

    def _new_segment(self, size: int, small: bool) -> Block:
        block = Block(self._end, size, small)
        self._end += size
        return block

    def _insert_free(self, block: Block) -> None:
        bisect.insort(self._free[block.small], block.key())
        self._blocks[block.key()] = block

    def _remove_free(self, block: Block) -> None:
        pool = self._free[block.small]
        del pool[bisect.bisect_left(pool, block.key())]
        del self._blocks[block.key()]

    @staticmethod
    def _merge(block: Block, neighbour: Block) -> Block:
        """One free block covering two adjacent ones."""
        first, second = (neighbour, block) if neighbour.address < block.address else (block, neighbour)
        first.size += second.size
        first.next = second.next
        if second.next is not None:
            second.next.prev = first
        return first


# ----------------------------------------------------------------------------------------------
# Autocast's CUDA cast policy (ATen autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
# AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE, AT_FORALL_PROMOTE)

CUDA_LOWER_PRECISION = frozenset("""
    _convolution.deprecated _convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d.input
    conv_transpose3d.input convolution prelu addmm addmv addr matmul einsum mm mv linalg_vecdot linear addbmm
    baddbmm bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell gru_cell
    rnn_tanh_cell rnn_relu_cell _scaled_dot_product_flash_attention scaled_dot_product_attention
    cudnn_convolution cudnn_convolution_transpose""".split())
CUDA_FP32 = frozenset("""
    acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow.Tensor_Scalar
    pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm rms_norm group_norm frobenius_norm.dim
    nuclear_norm nuclear_norm.dim cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d
    hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss
    multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits
    dist pdist cdist renorm logsumexp upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d
    _upsample_nearest_exact2d upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d
    _upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d _upsample_bicubic2d_aa""".split())
CUDA_FP32_SET_DTYPE = frozenset("""
    prod prod.dim_int softmax.int log_softmax.int cumprod cumsum linalg_vector_norm linalg_matrix_norm
    linalg_matrix_norm.str_ord sum sum.dim_IntList""".split())
CUDA_FP32_APPEND_DTYPE = {'norm.Scalar': 'ScalarOpt_dtype', 'norm.ScalarOpt_dim': 'ScalarOpt_dim_dtype'}
CUDA_PROMOTE = frozenset('addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot '
                         'scatter_add'.split())
CUDA_BANNED = frozenset({'binary_cross_entropy'})   # CUDA raises; the CPU's kernel is left alone

_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _eligible(value: object) -> bool:
    """What autocast casts: floating-point tensors other than float64."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64


def _cast(args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    return tree_map(lambda v: v.to(dtype) if _eligible(v) else v, (args, kwargs))


def _first_tensor(args: tuple) -> object:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


def _policy_kernel(op: torch._ops.OpOverload, policy: str) -> Callable:
    """An AutocastCPU kernel applying CUDA's ``policy`` to ``op`` (no weight cache: see
    :func:`cuda_autocast_policy`)."""
    packet = op.overloadpacket

    def kernel(*args, **kwargs):
        lower = torch.get_autocast_dtype('cpu')
        if policy == 'lower':
            args, kwargs = _cast(args, kwargs, lower)
        elif policy == 'fp32':
            args, kwargs = _cast(args, kwargs, torch.float32)
        elif policy == 'promote':
            leaves = [v for v in tree_leaves((args, kwargs)) if _eligible(v)]
            wide = torch.float32 if any(v.dtype == torch.float32 for v in leaves) else lower
            args, kwargs = _cast(args, kwargs, wide)
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            if policy == 'fp32_set_dtype' and _eligible(_first_tensor(args)) and kwargs.get('dtype') is None:
                return op(*args, **{**kwargs, 'dtype': torch.float32})
            if policy.startswith('append:') and _eligible(_first_tensor(args)):
                return getattr(packet, policy[len('append:'):])(*args, dtype=torch.float32, **kwargs)
            return op(*args, **kwargs)
    return kernel


def _op(name: str) -> torch._ops.OpOverload:
    packet, _, overload = name.partition('.')
    return getattr(getattr(torch.ops.aten, packet), overload or 'default')


def cuda_policies() -> dict[str, str]:
    """The op overloads whose CPU autocast behaviour differs from CUDA's, with CUDA's policy
    ('lower', 'fp32', 'fp32_set_dtype', 'append:<overload>', 'promote' or 'none': no cast)."""
    on_cpu = {name.removeprefix('aten::') for name in torch._C._dispatch_get_all_op_names()
              if name.startswith('aten::') and torch._C._dispatch_has_kernel_for_dispatch_key(name, 'AutocastCPU')}
    policies = {name: 'lower' for name in CUDA_LOWER_PRECISION - on_cpu}   # shared ones keep the weight cache
    policies.update(dict.fromkeys(CUDA_FP32, 'fp32'))
    policies.update(dict.fromkeys(CUDA_FP32_SET_DTYPE, 'fp32_set_dtype'))
    policies.update({name: f'append:{target}' for name, target in CUDA_FP32_APPEND_DTYPE.items()})
    policies.update(dict.fromkeys(CUDA_PROMOTE, 'promote'))
    known = CUDA_LOWER_PRECISION | set(policies) | CUDA_BANNED
    policies.update(dict.fromkeys(on_cpu - known, 'none'))
    return policies


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """Within, ``torch.autocast('cpu')`` casts as ``torch.autocast('cuda')`` does.

    Ops that both devices run in lower precision keep the CPU's C++ kernel, hence autocast's weight
    cache (fp32 leaf weights cast once per autocast region), which is CUDA's too. The other CUDA
    policies are Python kernels at the AutocastCPU dispatch key; the ops that only the CPU casts run
    uncast. The registrations are removed on exit.
    """
    library = torch.library.Library('aten', 'IMPL')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')   # "overriding a previously registered kernel"
            for name, policy in cuda_policies().items():
                library.impl(name, _policy_kernel(_op(name), policy), 'AutocastCPU')
        yield
    finally:
        library._destroy()


# ----------------------------------------------------------------------------------------------
# Fused Adam


def use_fused_adam(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Switch Adam-family optimizers to their fused kernel, which the trainer picks on CUDA."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if 'fused' in group:
                group.update(fused=True, foreach=False)
        optimizer._step_supports_amp_scaling = True   # what Optimizer.__init__ sets for fused ones
