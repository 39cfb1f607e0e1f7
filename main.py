"""Command line: flags (options.py) → validated config (config.py) → a training run or an inference phase."""
from __future__ import annotations

import sys

from config import Config
from errors import Stopped, UserError
from options import architecture_flags, build_parser, parse_args

__all__ = ['architecture_flags', 'build_parser', 'main', 'parse_args', 'run']


def run(config: Config) -> None:
    """Dispatch to the phase: training builds the trainer and runs it, inference only the checkpoint's
    generators."""
    if config.run.phase == 'train':
        import training_loop
        from ugatit import UGATIT
        config = training_loop.settle_recompute(config, training_loop.memory_estimator(UGATIT))
        training_loop.train(UGATIT(config), config)
    else:
        from inference import phases
        phases.run(config)


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return getattr(exc, 'exit_code', 2)
    except Stopped as stop:   # a signal: checkpoint saved, the status says why (see signals.py)
        print(stop, file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
