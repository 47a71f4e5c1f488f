"""Metrics for similarity explanations: insertion/deletion, pointing game, mass on a mask."""

from .causal import CausalCurves, CausalResult, curve_auc, insertion_deletion, normalize_curves, saliency_rank
from .pointing import chance_level, mass_on_mask, pointing_game
from .substrate import gaussian_blur, make_substrate

__all__ = ["insertion_deletion", "CausalResult", "CausalCurves", "saliency_rank", "curve_auc",
           "normalize_curves", "pointing_game", "mass_on_mask", "chance_level", "make_substrate", "gaussian_blur"]
