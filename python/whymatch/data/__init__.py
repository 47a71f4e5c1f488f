"""Data sets: ShapesWorld, a generated set with ground-truth explanations."""

from .shapesworld import (
    ATTRIBUTE_NAMES,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    DISTRACTOR_SIZES,
    KEY_SIZES,
    N_CLASSES,
    PATTERNS,
    SHAPES,
    SIZES,
    TEST_CLASSES,
    TRAIN_CLASSES,
    ObjectInfo,
    PairSet,
    ShapesSample,
    ShapesWorld,
    class_attributes,
    class_id,
    split_classes,
)

__all__ = [
    "ATTRIBUTE_NAMES", "BACKGROUNDS", "COLOUR_RGB", "COLOURS", "DISTRACTOR_SIZES", "KEY_SIZES", "N_CLASSES",
    "PATTERNS", "SHAPES", "SIZES", "TEST_CLASSES", "TRAIN_CLASSES", "ObjectInfo", "PairSet", "ShapesSample",
    "ShapesWorld", "class_attributes", "class_id", "split_classes",
]
