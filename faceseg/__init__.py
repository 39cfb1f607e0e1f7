"""Face segmentation (BiSeNet face parsing) for the background-preservation options."""

from faceseg.bisenet import BiSeNet, load_bisenet
from faceseg.errors import FaceWeightsError
from faceseg.segmenter import FaceSegmenter, SegMasks, masks_from_probs

__all__ = ['BiSeNet', 'FaceSegmenter', 'FaceWeightsError', 'SegMasks', 'load_bisenet', 'masks_from_probs']
