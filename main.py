"""Command line: flags (options.py) → validated config → the UGATIT trainer or an inference phase."""
from __future__ import annotations

import argparse
import sys

import utils
from images import DatasetError
from options import architecture_flags, build_parser, parse_args

__all__ = ['architecture_flags', 'build_parser', 'main', 'parse_args', 'run']


def run(cfg: argparse.Namespace) -> None:
    """Dispatch to the phase: training builds the trainer, inference only the checkpoint's generators."""
    if cfg.phase == 'train':
        from ugatit import UGATIT
        UGATIT(cfg).train()
    else:
        from inference import phases
        phases.run(cfg)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        run(cfg)
    except (utils.UserError, DatasetError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    except _weights_errors() as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    except utils.Stopped as stop:   # a signal: checkpoint saved, the status says why (see utils)
        print(stop, file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    return 0


def _weights_errors() -> tuple[type[Exception], ...]:
    """User-facing errors of the optional packages (missing weights files and the like)."""
    errors: list[type[Exception]] = []
    try:
        from faceseg.errors import FaceWeightsError
        errors.append(FaceWeightsError)
    except ImportError:
        pass
    try:
        from metrics import MetricsError
        errors.append(MetricsError)
    except ImportError:
        pass
    return tuple(errors)


if __name__ == '__main__':
    sys.exit(main())
