"""User-facing errors of the face-segmentation package."""

import os

from errors import FaceWeightsError

WEIGHTS_SOURCE = 'https://github.com/zllrunning/face-parsing.PyTorch (README: "our pre-trained model")'


def weights_error(path: str | os.PathLike, reason: str) -> FaceWeightsError:
    """Build the one-line error for an unusable BiSeNet weights file."""
    return FaceWeightsError(
        f"--faceseg_weights: cannot use BiSeNet weights '{os.fspath(path)}' ({reason}); "
        f"download 79999_iter.pth from {WEIGHTS_SOURCE} and pass its path with --faceseg_weights"
    )
