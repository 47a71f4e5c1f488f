"""Saliency explainers for similarity models: one class per method, work in ``.attribute``."""

from ._common import ConstantMapWarning, constant_maps
from .attention import SimilarityAttention
from .gradcam import EmbeddingGradCAM
from .lime import LIME, LimeResult
from .mask import Mask
from .rise import RISE
from .sliding_window import SlidingWindow

__all__ = ["ConstantMapWarning", "constant_maps", "RISE", "SlidingWindow", "LIME", "LimeResult", "Mask", "SimilarityAttention", "EmbeddingGradCAM"]
