"""Face detection (MTCNN), similarity alignment, and pasting translated crops back into frames.

Used by scripts/prepare_faces.py (aligned training crops) and by the video/camera/img_dir phases
with --align_faces (crop → generator → paste back). Images are RGB uint8 arrays, H×W×3.

Alignment geometry, for an out×out crop and margin m ≥ 0: the face "core" is a square of side
c = out / (1 + 2m) centred horizontally, with a border of m·c on every side. The eyes are put on a
horizontal line, their midpoint at (out/2, out·(m + EYE_Y)/(1 + 2m)) and their distance is
EYE_DISTANCE·c = out·EYE_DISTANCE/(1 + 2m). With the defaults (EYE_Y 0.4, EYE_DISTANCE 0.45) a
margin of 0 is a tight face crop, and m = 0.4 keeps hair and chin (eyes 0.25·out apart at
y ≈ 0.44·out), close to the framing of selfie2anime.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import cv2
import numpy as np
from facenet_pytorch import MTCNN

EYE_Y = 0.4  # eye line, as a fraction of the core square from its top
EYE_DISTANCE = 0.45  # inter-ocular distance, as a fraction of the core square's side
MAX_SUPERSAMPLE = 4  # warp at up to 4× the output size before an area resize (anti-aliasing)


class Face(NamedTuple):
    """One detected face: box (x1, y1, x2, y2), 5×2 landmarks (left eye, right eye, nose,
    mouth left, mouth right, in image pixels as MTCNN gives them) and detection probability."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    prob: float

    @property
    def area(self) -> float:
        """Box area in pixels²."""
        x1, y1, x2, y2 = self.box
        return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Grey (H×W), RGB or RGBA uint8 → contiguous RGB uint8 H×W×3."""
    if image.dtype != np.uint8:
        raise ValueError(f'expected a uint8 image, got {image.dtype}')
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f'expected an H×W×3 RGB image, got shape {image.shape}')
    return np.ascontiguousarray(image[:, :, :3])


class FaceDetector:
    """MTCNN face detector (weights ship with facenet-pytorch, so it works offline)."""

    def __init__(self, min_face_size: int = 40, device: str = 'cpu',
                 thresholds: Sequence[float] | None = None) -> None:
        self.min_face_size = min_face_size
        self.mtcnn = MTCNN(keep_all=True, min_face_size=min_face_size, select_largest=True,
                           thresholds=list(thresholds or (0.6, 0.7, 0.7)), post_process=False,
                           device=device)

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 image, largest first (empty list if none)."""
        image = as_rgb(image)
        if min(image.shape[:2]) < self.min_face_size:
            return []  # MTCNN's image pyramid is empty (and it crashes) below the minimum face size
        boxes, probs, points = self.mtcnn.detect(image, landmarks=True)
        if boxes is None:
            return []
        faces = [Face(tuple(float(v) for v in box), np.asarray(pts, dtype=np.float64).reshape(5, 2),
                      float(prob)) for box, prob, pts in zip(boxes, probs, points)]
        return sorted(faces, key=lambda face: face.area, reverse=True)


def alignment_matrix(landmarks: np.ndarray, out_size: int, margin: float = 0.4) -> np.ndarray:
    """2×3 similarity transform (image → crop) from 5 landmarks; see the module docstring."""
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    left_eye, right_eye = points[0], points[1]
    dx, dy = right_eye - left_eye
    eye_distance = math.hypot(dx, dy)
    if eye_distance < 1e-6:
        raise ValueError('the two eye landmarks coincide')
    core = out_size / (1.0 + 2.0 * margin)
    scale = EYE_DISTANCE * core / eye_distance
    cos, sin = scale * dx / eye_distance, scale * dy / eye_distance
    # Rotation by −angle(eye vector) maps the eye vector onto the +x axis.
    linear = np.array([[cos, sin], [-sin, cos]])
    target = np.array([out_size / 2.0, (margin + EYE_Y) * core])
    translation = target - linear @ ((left_eye + right_eye) / 2.0)
    return np.hstack([linear, translation[:, None]])


def _transform_scale(matrix: np.ndarray) -> float:
    return float(math.sqrt(abs(np.linalg.det(matrix[:, :2]))))


def align_face(image: np.ndarray, landmarks: np.ndarray, out_size: int = 256,
               margin: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Aligned out×out×3 uint8 crop (reflected border) and its 2×3 image → crop matrix."""
    image = as_rgb(image)
    matrix = alignment_matrix(landmarks, out_size, margin)
    # When shrinking, warp at an integer multiple of the size and area-resize, to avoid aliasing.
    factor = min(MAX_SUPERSAMPLE, max(1, math.ceil(1.0 / _transform_scale(matrix))))
    big = matrix * factor
    big[:, 2] += (factor - 1) / 2.0  # pixel-centre convention of cv2.resize
    crop = cv2.warpAffine(image, big, (out_size * factor,) * 2, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)
    if factor > 1:
        crop = cv2.resize(crop, (out_size, out_size), interpolation=cv2.INTER_AREA)
    return crop, matrix


def feather_mask(size: int, feather: float = 0.1) -> np.ndarray:
    """size×size float32 mask: 1 inside, smoothly falling to 0 over a border of feather·size."""
    ramp_width = feather * size
    distance = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32) + 0.5
    ramp = np.clip(distance / ramp_width, 0.0, 1.0) if ramp_width > 0 else np.ones(size, np.float32)
    ramp = ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep: no visible kink where the ramp ends
    return np.outer(ramp, ramp).astype(np.float32)


def paste_back(frame: np.ndarray, crop: np.ndarray, matrix: np.ndarray,
               feather: float = 0.1) -> np.ndarray:
    """Warp a (translated) crop back into a copy of frame and blend it with a feathered mask.

    crop must have the size the matrix was made for. Pixels outside the crop's footprint are
    returned unchanged.
    """
    frame = as_rgb(frame)
    size = crop.shape[0]
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inverse.T
    height, width = frame.shape[:2]
    x0, y0 = (max(0, math.floor(v) - 1) for v in corners.min(axis=0))
    x1, y1 = min(width, math.ceil(corners[:, 0].max()) + 1), min(height, math.ceil(corners[:, 1].max()) + 1)
    result = frame.copy()
    if x1 <= x0 or y1 <= y0:
        return result
    # Warp only into the footprint's bounding box: cheap for small faces in large frames.
    local = inverse.copy()
    local[:, 2] -= (x0, y0)
    roi_size = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(as_rgb(crop), local, roi_size, flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    alpha = cv2.warpAffine(feather_mask(size, feather), local, roi_size, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)[:, :, None]
    roi = result[y0:y1, x0:x1].astype(np.float32)
    blended = roi + alpha * (warped - roi)  # exactly roi where alpha is 0
    result[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return result


class FaceAligner:
    """Detector + alignment: aligned crops of an image, and translate-and-paste-back of frames."""

    def __init__(self, min_face_size: int = 40, device: str = 'cpu',
                 thresholds: Sequence[float] | None = None, detector: FaceDetector | None = None) -> None:
        self.detector = detector or FaceDetector(min_face_size, device, thresholds)
        self.faces_found = 0   # faces in the last frame given to apply()

    def crops(self, image: np.ndarray, out_size: int = 256, margin: float = 0.4,
              all_faces: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """(crop, matrix) for the largest face, or for every face (largest first) with all_faces."""
        faces = self.detector.detect(image)
        if not all_faces:
            faces = faces[:1]
        return [align_face(image, face.landmarks, out_size, margin) for face in faces]

    def apply(self, frame: np.ndarray, translate: Callable[[np.ndarray], np.ndarray],
              out_size: int = 256, margin: float = 0.4, all_faces: bool = False,
              feather: float = 0.1) -> np.ndarray:
        """Translate the face(s) of a frame with translate(crop) → crop and paste them back.

        A frame without a face is returned unchanged (as a copy).
        """
        result = as_rgb(frame).copy()
        crops = self.crops(frame, out_size, margin, all_faces)
        self.faces_found = len(crops)
        for crop, matrix in crops:
            translated = translate(crop)
            if translated.shape[:2] != (out_size, out_size):
                translated = cv2.resize(translated, (out_size, out_size), interpolation=cv2.INTER_LINEAR)
            result = paste_back(result, translated, matrix, feather)
        return result
