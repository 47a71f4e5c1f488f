"""Data sets: ShapesWorld, a generated set with ground-truth explanations, the DML retrieval
benchmarks (CUB-200-2011, Cars196, Stanford Online Products) and the attribute data sets
(Animals with Attributes 2, Polyvore Outfits) read from local paths."""

from .awa2 import AwA2
from .polyvore import DEFAULT_ATTRIBUTES_FILE, PolyvoreOutfits
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
    "AwA2", "PolyvoreOutfits", "DEFAULT_ATTRIBUTES_FILE",
]
