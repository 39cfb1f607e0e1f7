"""FID/KID with the pytorch-fid Inception: scores, feature extraction, caching and a CLI."""

from .evaluator import Evaluator, FeatureCache, folder_features, image_files, require_images
from .inception import build_inception, fid_inception_backbone, inception_features
from .scores import MetricsError, feature_statistics, frechet_distance, kernel_inception_distance

__all__ = [
    'Evaluator',
    'FeatureCache',
    'MetricsError',
    'build_inception',
    'feature_statistics',
    'fid_inception_backbone',
    'folder_features',
    'frechet_distance',
    'image_files',
    'inception_features',
    'kernel_inception_distance',
    'require_images',
]
