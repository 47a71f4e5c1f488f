"""Saliency explainers for similarity models: one class per method, work in ``.attribute``."""

from .attention import SimilarityAttention
from .gradcam import EmbeddingGradCAM
from .lime import LIME, LimeResult
from .mask import Mask
from .rise import RISE
from .sliding_window import SlidingWindow

__all__ = ["RISE", "SlidingWindow", "LIME", "LimeResult", "Mask", "SimilarityAttention", "EmbeddingGradCAM"]
