"""Embedding networks. ``load_default_model()`` gives the ShapesWorld CNN that ships with whymatch."""

from .shapes_cnn import ShapesCNN, default_weights_path, load_default_model

__all__ = ["ShapesCNN", "default_weights_path", "load_default_model"]
