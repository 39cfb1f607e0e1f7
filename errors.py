"""Every error the project raises for its users, in one place: what the command line prints on one line.

``main.py`` prints a :class:`UserError` as ``error: <message>`` and exits with status 2, no
traceback; the message says what is wrong and how to fix it. :class:`Stopped` is not an error but
the run's answer to a stop signal: a checkpoint is saved and ``exit_code`` tells a job script why.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the CLI prints it on one line and exits with code 2."""


# -- data ------------------------------------------------------------------------------------------

class DatasetError(UserError):
    """A user-fixable data problem; the message says what is wrong and how to fix it."""


class UnreadableImage(DatasetError):
    """A file with an image extension that cannot be decoded."""


class TooManyUnreadable(DatasetError):
    """Too much of a training domain (or a whole group) cannot be read."""


# -- checkpoints and weights -------------------------------------------------------------------------

class DiskFull(UserError):
    """A checkpoint did not fit on its disk; the partial file is gone, the older ones are intact."""


class UnsafeCheckpoint(UserError):
    """A checkpoint holding pickled Python objects, which ``weights_only`` loading refuses."""


class UnreadableCheckpoint(UserError):
    """A file given or found as a checkpoint that is not one, or is cut short."""


class CheckpointError(UserError, ValueError):
    """The files are not a readable TF V2 checkpoint (missing, truncated, corrupt or unsupported)."""


class FaceWeightsError(UserError):
    """A required face-model weights file (BiSeNet, FaceNet) is missing or unusable."""


class MetricsError(UserError):
    """A metrics problem the user can fix (Inception weights, image folders)."""


# -- the run -------------------------------------------------------------------------------------------

class TrainingDiverged(UserError):
    """A loss became NaN or infinite."""


class OutOfMemory(UserError):
    """The config does not fit the GPU: at start-up (from the estimate) or a CUDA out-of-memory error."""


class WorkerDied(UserError):
    """A data-loading worker died where the step could not be undone; exit status 75 (EX_TEMPFAIL:
    try again, with --resume True)."""

    exit_code = 75


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` tells a job script why."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- bugs found by checks ---------------------------------------------------------------------------------

class CaptureError(RuntimeError):
    """The training step does something a captured step (--cuda_graph) cannot: a bug in the step, not in
    the user's input (step_capture.EmulatedGraphs raises it in the tests)."""
