"""Saliency explainers for similarity models: one class per method, work in ``.attribute``."""

from .rise import RISE
from .sliding_window import SlidingWindow

__all__ = ["RISE", "SlidingWindow"]
