"""whymatch ops: the only layer that touches the compiled kernels.

Public functions validate their arguments and call ops registered with
torch.library as ``torch.ops.whymatch.*``; ``reference`` holds the pure-PyTorch
definitions that the kernels are tested against.
"""

from . import reference
from ._validate import check_finite_enabled, set_check_finite
from .avsl import avsl_distance, avsl_topk, cam_correlation, cam_reliability, cam_statistics, link_star
from .mining import soft_mask
from .perturb import ranked_blend, rise_apply, rise_saliency

__all__ = ["reference", "set_check_finite", "check_finite_enabled", "rise_apply", "rise_saliency", "ranked_blend", "soft_mask", "cam_reliability",
           "cam_correlation", "cam_statistics", "link_star", "avsl_distance", "avsl_topk"]
