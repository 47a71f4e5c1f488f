"""Saliency explainers for similarity models: one class per method, work in ``.attribute``.

Every explainer subclasses :class:`~whymatch.saliency.base.Explainer` (``sim`` first, ``attribute(query,
references)`` -> (K, H, W)); :mod:`whymatch.saliency.registry` names them for the jobs and the CLI.
"""

from ._common import ConstantMapWarning, constant_maps
from .attention import SimilarityAttention
from .base import DEFAULT_BATCH_SIZE, Explainer
from .gradcam import EmbeddingGradCAM
from .lime import LIME, LimeResult
from .mask import Mask
from .rise import RISE
from .sliding_window import SlidingWindow

__all__ = ["Explainer", "DEFAULT_BATCH_SIZE", "ConstantMapWarning", "constant_maps", "RISE", "SlidingWindow", "LIME", "LimeResult", "Mask", "SimilarityAttention", "EmbeddingGradCAM"]
