"""Data sets: ShapesWorld, a generated set with ground-truth explanations, and the DML retrieval
benchmarks (CUB-200-2011, Cars196, Stanford Online Products) read from local paths."""

from .retrieval import (
    RETRIEVAL_DATASETS,
    CUB200,
    SOP,
    Cars196,
    RetrievalDataset,
    StanfordOnlineProducts,
    retrieval_dataset,
)
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
from .transforms import ResizeCrop, eval_transform, pil_to_tensor, train_transform

__all__ = [
    "ATTRIBUTE_NAMES", "BACKGROUNDS", "COLOUR_RGB", "COLOURS", "DISTRACTOR_SIZES", "KEY_SIZES", "N_CLASSES",
    "PATTERNS", "SHAPES", "SIZES", "TEST_CLASSES", "TRAIN_CLASSES", "ObjectInfo", "PairSet", "ShapesSample",
    "ShapesWorld", "class_attributes", "class_id", "split_classes",
    "RETRIEVAL_DATASETS", "CUB200", "SOP", "Cars196", "RetrievalDataset", "StanfordOnlineProducts",
    "retrieval_dataset", "ResizeCrop", "eval_transform", "pil_to_tensor", "train_transform",
]
