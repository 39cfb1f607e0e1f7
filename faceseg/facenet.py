"""Frozen FaceNet (Inception-ResNet-v1) embeddings for the face-distance (identity) loss.

The FN fork adds ``w·‖f(a) − f(G_AB(a))‖²`` (and the B→A twin) to the generator loss, with ``f`` a
frozen FaceNet. Two of its bugs are avoided here: the weights are loaded once and never
re-initialised, and the distance is computed per sample, so any batch size is correct.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from facenet_pytorch import InceptionResnetV1
from torch import nn

from faceseg.errors import FaceWeightsError

FACENET_SIZE = 160  # input resolution facenet-pytorch's models were trained at
PRETRAINED_CHOICES = ('vggface2', 'casia-webface')
WEIGHT_SUFFIXES = ('.pt', '.pth')
# [-1,1] → fixed_image_standardization: x01·255 = (x+1)·127.5, so (x01·255 − 127.5)/128 = x·127.5/128.
_STANDARDISE = 127.5 / 128.0


def _one_line(error: BaseException) -> str:
    return ' '.join(str(error).split()) or type(error).__name__


def _read_state_dict(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """Read a state dict from disk and drop the classifier ('logits.*') keys."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = _one_line(error)
        raise FaceWeightsError(f"{flag}: cannot read FaceNet weights '{path}' ({reason})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FaceWeightsError(f"{flag}: '{path}' is not a state dict of tensors")
    return {k: v for k, v in state.items() if not k.startswith('logits.')}


def _from_file(path: Path, flag: str) -> InceptionResnetV1:
    net = InceptionResnetV1(classify=False)
    state = _read_state_dict(path, flag)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        expected = set(net.state_dict())
        missing, unexpected = len(expected - set(state)), len(set(state) - expected)
        raise FaceWeightsError(
            f"{flag}: '{path}' is not an InceptionResnetV1 state dict "
            f"({missing} missing, {unexpected} unexpected keys, or wrong shapes)"
        ) from error
    return net


def _single_weights_file(checkpoint_dir: Path) -> Path:
    """The one .pt/.pth file in checkpoint_dir (FN's --facenet_checkpoint_dir holds one model)."""
    flag = '--facenet_checkpoint_dir'
    if not checkpoint_dir.is_dir():
        raise FaceWeightsError(f"{flag}: folder not found: '{checkpoint_dir}'")
    files = sorted(p for p in checkpoint_dir.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    if len(files) != 1:
        found = ', '.join(p.name for p in files) or 'none'
        raise FaceWeightsError(
            f"{flag}: expected exactly one .pt/.pth file in '{checkpoint_dir}', found {found}; "
            "pass the file itself with --facenet_weights FILE"
        )
    return files[0]


def _from_pretrained(name: str) -> InceptionResnetV1:
    """facenet-pytorch's own download; any failure becomes a one-line FaceWeightsError."""
    if name not in PRETRAINED_CHOICES:
        raise FaceWeightsError(f"--facenet_pretrained: unknown '{name}', choose one of {PRETRAINED_CHOICES}")
    try:
        net = InceptionResnetV1(pretrained=name, classify=False)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        # URLError/HTTPError are OSErrors; a truncated cached file fails in torch.load.
        raise FaceWeightsError(
            f"--facenet_pretrained {name}: could not get the weights ({_one_line(error)}); "
            "download them elsewhere and pass --facenet_weights FILE"
        ) from error
    del net.logits  # classifier head of the training identities, unused for embeddings
    return net


def load_facenet(
    weights: str | os.PathLike | None = None,
    pretrained: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    device: str | torch.device = 'cpu',
) -> InceptionResnetV1:
    """A frozen InceptionResnetV1 (eval mode, no trainable parameters) from exactly one weight source.

    weights: a state-dict file ('logits.*' keys are ignored, everything else must match);
    checkpoint_dir: a folder holding exactly one such .pt/.pth file;
    pretrained: 'vggface2' or 'casia-webface', downloaded by facenet-pytorch (needs internet).
    """
    given = [name for name, value in (('--facenet_weights', weights), ('--facenet_pretrained', pretrained),
                                      ('--facenet_checkpoint_dir', checkpoint_dir)) if value is not None]
    if not given:
        raise FaceWeightsError(
            'the face distance loss needs FaceNet weights: pass --facenet_weights FILE '
            '(an InceptionResnetV1 state dict), --facenet_checkpoint_dir DIR or --facenet_pretrained vggface2'
        )
    if len(given) > 1:
        raise FaceWeightsError(f"give only one FaceNet weight source, not {' and '.join(given)}")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FaceWeightsError(f"--facenet_weights: file not found: '{path}'")
        net = _from_file(path, '--facenet_weights')
    elif checkpoint_dir is not None:
        net = _from_file(_single_weights_file(Path(checkpoint_dir)), '--facenet_checkpoint_dir')
    else:
        net = _from_pretrained(pretrained)
    net.requires_grad_(False)
    return net.eval().to(device)


class FaceIdentity(nn.Module):
    """Identity distance between faces: squared Euclidean distance of frozen FaceNet embeddings.

    Inputs are image batches in [-1, 1] of any size; gradients flow to the images, never to FaceNet.
    """

    def __init__(self, net: InceptionResnetV1) -> None:
        super().__init__()
        net.requires_grad_(False)
        self.net = net.eval()

    @classmethod
    def load(cls, weights: str | os.PathLike | None = None, pretrained: str | None = None,
             checkpoint_dir: str | os.PathLike | None = None,
             device: str | torch.device = 'cpu') -> FaceIdentity:
        """Build from the same weight sources as load_facenet."""
        return cls(load_facenet(weights, pretrained, checkpoint_dir, device))

    def train(self, mode: bool = True) -> FaceIdentity:
        """Switch the wrapper's mode but keep FaceNet in eval (batch-norm statistics stay frozen)."""
        super().train(mode)
        self.net.eval()
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B×3×H×W images in [-1, 1] → B×512 L2-normalised embeddings."""
        x = F.interpolate(images, size=(FACENET_SIZE, FACENET_SIZE), mode='bilinear',
                          align_corners=False, antialias=False)
        return self.net(x * _STANDARDISE)

    def forward(self, source: torch.Tensor, translated: torch.Tensor) -> torch.Tensor:
        """Per-sample ‖f(source) − f(translated)‖², shape B, in [0, 4]."""
        if source.requires_grad:
            source_embedding = self.embed(source)
        else:
            with torch.no_grad():  # a constant target: no activations kept for backward
                source_embedding = self.embed(source)
        return (source_embedding - self.embed(translated)).pow(2).sum(dim=1)
