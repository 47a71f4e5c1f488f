"""SANE attribute explanations (Plummer et al., "Why do These Match?", ECCV 2020).

- :class:`AttributeModel` (``model``): attribute activation maps and confidences of an image, trained
  with saliency supervision (:class:`AttributeLoss`, ``losses``) on saliency maps cached in bulk
  (:class:`SaliencyCache`, ``cache``); ``whymatch train sane`` (``train``).
- :class:`TCAV` (``tcav``): concept activation vectors over the similarity embedding and their
  triplet-loss sensitivities, a prior over attributes; :class:`PairSensitivity`: the same directional
  derivative at one pair (how much this pair's similarity relies on each attribute).
- :class:`SANE` (``explain``): a saliency map plus the attributes ranked by Eq. 4.
- :func:`discover_attributes` (``discovery``): attributes found from saliency peaks when none are annotated.

Metrics (mAP, attribute insertion and deletion) are in :mod:`whymatch.metrics.attributes`.
"""

from .cache import SaliencyCache
from .discovery import DiscoveredAttributes, discover_attributes, full_frame_attributes
from .explain import SANE, AttributeExplanation, AttributeTerms, phi_grid, rank_scores
from .losses import AttributeLoss, normalize_maps
from .model import (
    AttributeModel,
    AttributeOutput,
    build_attribute_model,
    load_attribute_model,
    load_default_attribute_model,
)
from .tcav import TCAV, PairSensitivity, TCAVSignificance

__all__ = ["AttributeModel", "AttributeOutput", "build_attribute_model", "load_attribute_model",
           "load_default_attribute_model", "AttributeLoss", "normalize_maps", "SaliencyCache", "TCAV",
           "TCAVSignificance", "PairSensitivity", "SANE", "AttributeExplanation", "AttributeTerms", "rank_scores", "phi_grid",
           "DiscoveredAttributes", "discover_attributes", "full_frame_attributes"]
