"""Does a training config fit the GPU? The estimate (memory.py) against the card, and the flags that fit.

Its own module because the start-up check and the out-of-memory message of the run loop, and the
README's "Which card?" table, all ask the same two questions: how much does this config need, and
which of the memory options (exact ones first, then the lower-precision opt-ins, then the light
model) would make it fit a card of a given size.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from config import Config
from memory import GiB, MemoryReport

# What to try when a config does not fit, in order: the exact savings first, then state in lower
# precision (not exact), then the light model (another model). Flag name -> value, as the CLI spells it.
CANDIDATES: tuple[dict[str, object], ...] = (
    {'recompute': True},
    {'recompute': True, 'ema_dtype': 'bf16'},
    {'recompute': True, 'optim_state': '8bit', 'ema_dtype': 'bf16'},
    {'recompute': True, 'optim_state': '4bit', 'ema_dtype': 'bf16'},
    {'recompute': True, 'optim_state': '4bit', 'ema_dtype': 'bf16', 'amp': 'bf16'},
    {'light': True},
)
# The caching allocator's fragmentation and the cuBLAS/cuDNN workspaces the estimate leaves out.
MARGIN = 0.05

Estimator = Callable[[Config], MemoryReport]


@dataclass(frozen=True)
class Fit:
    """A config's estimated peak against the memory a card leaves this process."""

    needed: int
    usable: int
    total: int

    @property
    def fits(self) -> bool:
        return self.needed * (1 + MARGIN) <= self.usable

    def line(self, device: str) -> str:
        verdict = 'fits' if self.fits else 'does not fit'
        return (f'memory: this config needs about {self.needed / GiB:.2f} GiB at its peak (estimated); {device} has '
                f'{self.usable / GiB:.2f} GiB for it of {self.total / GiB:.2f} GiB: it {verdict}')


def with_flags(config: Config, flags: dict[str, object]) -> Config:
    """The config with some flags changed (resolved values, as validation leaves them)."""
    return Config.from_values({**config.values, **flags}, config.explicit)


def spell(flags: dict[str, object]) -> str:
    return ' '.join(f'--{name} {value}' for name, value in flags.items())


def flags_that_fit(config: Config, estimate: Estimator, usable: int) -> list[tuple[str, int]]:
    """The first of the memory options that fits ``usable`` bytes, and the light model if it fits too:
    [(flags as typed, estimated peak)]."""
    found = []
    *options, light = CANDIDATES
    for flags in options:
        needed = _needed_if_changed(config, flags, estimate)
        if needed is not None and Fit(needed, usable, usable).fits:
            found.append((spell(flags), needed))
            break
    needed = _needed_if_changed(config, light, estimate)
    if needed is not None and Fit(needed, usable, usable).fits:
        found.append((spell(light), needed))
    return found


def _needed_if_changed(config: Config, flags: dict[str, object], estimate: Estimator) -> int | None:
    """The estimated peak with ``flags``; None when they are already the config's."""
    if all(config.values.get(name) == value for name, value in flags.items()):
        return None
    return estimate(with_flags(config, flags)).peak_bytes


def advice(config: Config, estimate: Estimator, usable: int) -> str:
    """'flags that fit: --recompute True (10.2 GiB) or --light True (3.1 GiB)', or why none does."""
    found = flags_that_fit(config, estimate, usable)
    if not found:
        return 'no memory option fits it: use a card with more memory, a smaller --img_size or --ch'
    return 'flags that fit: ' + ' or '.join(f'{flags} ({needed / GiB:.1f} GiB)' for flags, needed in found)
