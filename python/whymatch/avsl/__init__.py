"""AVSL (Zhang et al., "Attributable Visual Similarity Learning", CVPR 2022): a similarity model
that explains itself.

:class:`AVSL` (model, distances, retrieval), :class:`AVSLLoss` (Eq. 10) and
:meth:`AVSL.explain` (Eq. 11). The hot paths are :mod:`whymatch.ops.avsl`.
"""

from .explain import AVSLExplanation, LevelExplanation, explain_pair, node_sensitivities
from .losses import AVSLLoss, AVSLLossOutput, MarginDistanceLoss, ProxyAnchorDistanceLoss, proxy_anchor_distance
from .model import AVSL, RELIABILITY, AVSLEncoding, linearized_input

__all__ = ["AVSL", "AVSLEncoding", "RELIABILITY", "linearized_input", "AVSLLoss", "AVSLLossOutput",
           "MarginDistanceLoss", "ProxyAnchorDistanceLoss", "proxy_anchor_distance", "AVSLExplanation",
           "LevelExplanation", "explain_pair", "node_sensitivities"]
