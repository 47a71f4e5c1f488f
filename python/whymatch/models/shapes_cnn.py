"""A small CNN embedder for ShapesWorld and the weights that ship with whymatch.

The weights file ``whymatch/models/weights/shapesworld_cnn.pt`` is produced by
``scripts/train_shapesworld.py`` (fixed seed, CPU, a few minutes); its recall on
the held-out ShapesWorld classes is recorded in
``benchmarks/results/shapesworld_model.json``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..similarity import SimilarityModel
from ._shipped import open_shipped, shipped_path

__all__ = ["ShapesCNN", "load_default_model", "default_weights_path", "WEIGHTS_RESOURCE", "TRAIN_SCRIPT"]

#: Package-relative location of the shipped weights.
WEIGHTS_RESOURCE = ("whymatch.models", "weights/shapesworld_cnn.pt")
#: The script that writes the shipped weights.
TRAIN_SCRIPT = "scripts/train_shapesworld.py"

# Input normalization: ShapesWorld images are in [0, 1] with mean near 0.5.
_MEAN, _STD = 0.5, 0.25


def _block(c_in: int, c_out: int, n_convs: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(n_convs):
        layers += [nn.Conv2d(c_in if k == 0 else c_out, c_out, 3, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ShapesCNN(nn.Module):
    """Four conv blocks, global average pooling and a linear projection.

    Layout for a 96 x 96 input (default widths (16, 32, 64, 128)):

    ==========  ==============================================  ============
    block       layers                                          output
    ==========  ==============================================  ============
    layer1      conv3x3-BN-ReLU, maxpool 2                      16 x 48 x 48
    layer2      conv3x3-BN-ReLU, maxpool 2                      32 x 24 x 24
    layer3      conv3x3-BN-ReLU, maxpool 2                      64 x 12 x 12
    layer4      2 x (conv3x3-BN-ReLU)                           128 x 12 x 12
    head        global average pool, linear                     embedding_dim
    ==========  ==============================================  ============

    About 254k parameters (1 MB as float32); about 57 M multiply-adds per image.

    ``layer4`` (also ``features[-1]``) is the last convolutional block: the
    target layer for gradient / CAM methods. The input is normalized inside
    ``forward`` ((x - 0.5) / 0.25), so the model takes images in [0, 1].

    Args:
        embedding_dim: size D of the output embedding.
        widths: channels of layer1..layer4.

    Shapes:
        input (B, 3, H, W) float in [0, 1] (H, W >= 8; trained at 96 x 96);
        output (B, embedding_dim) float32, not normalized (use cosine similarity).
    """

    def __init__(self, embedding_dim: int = 64, widths: tuple[int, int, int, int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        if len(widths) != 4 or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"widths must be 4 positive ints, got {widths!r}")
        w1, w2, w3, w4 = widths
        self.layer1 = _block(3, w1, 1, pool=True)
        self.layer2 = _block(w1, w2, 1, pool=True)
        self.layer3 = _block(w2, w3, 1, pool=True)
        self.layer4 = _block(w3, w4, 2, pool=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w4, embedding_dim)
        self.embedding_dim = embedding_dim
        self.register_buffer("mean", torch.full((1, 3, 1, 1), _MEAN), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), _STD), persistent=False)

    @property
    def features(self) -> nn.Sequential:
        """The convolutional trunk layer1..layer4 as one Sequential (shares modules, no copy)."""
        return nn.Sequential(self.layer1, self.layer2, self.layer3, self.layer4)

    def feature_maps(self, x: Tensor) -> Tensor:
        """Last conv block's activations (B, widths[3], H/8, W/8) of images x (B, 3, H, W) in [0, 1]."""
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings (B, embedding_dim) of images x (B, 3, H, W) in [0, 1]."""
        return self.fc(self.pool(self.feature_maps(x)).flatten(1))


def default_weights_path() -> Path:
    """Filesystem path of the shipped ShapesWorld weights (where they belong when the file is missing)."""
    return shipped_path(WEIGHTS_RESOURCE)

def load_default_model(device: str | torch.device = "cpu", *,
                       weights: str | os.PathLike | None = None) -> SimilarityModel:
    """The shipped ShapesWorld CNN as a cosine-similarity :class:`whymatch.SimilarityModel`.

    Loads ``whymatch/models/weights/shapesworld_cnn.pt`` (a state dict, read with
    ``weights_only=True``) through importlib.resources; nothing is downloaded.

    Args:
        device: where to put the model.
        weights: another ShapesCNN state dict to load instead (for example a validation proxy
            written by ``scripts/train_shapesworld.py --classes half0 --weights PATH``), with the
            same checks.

    Returns:
        A SimilarityModel in eval mode wrapping a :class:`ShapesCNN`
        (embedding (B, 64), similarity 'cosine'), taking (B, 3, 96, 96) images in [0, 1].
        Its embedder's ``layer4`` is the last conv block.

    Raises:
        FileNotFoundError: the weights file is missing (the shipped one is written by
            ``python scripts/train_shapesworld.py``).
        whymatch.io.FileFormatError: the file is not a ShapesCNN() state dict.
    """
    from ..io import FileFormatError, check_tensor_dict, check_tensors_match, load_torch_file

    embedder = ShapesCNN()
    if weights is None:
        opened = open_shipped(WEIGHTS_RESOURCE, "ShapesWorld model weights", TRAIN_SCRIPT)
    else:
        if not isinstance(weights, (str, os.PathLike)):
            raise TypeError(f"weights must be a path or None, got {type(weights).__name__}")
        opened = contextlib.nullcontext(Path(weights))
    with opened as path:
        state = load_torch_file(path, "ShapesWorld model weights")
        try:
            check_tensors_match("the weights", check_tensor_dict("the weights", state), embedder.state_dict(),
                                "not a ShapesCNN()")
            embedder.load_state_dict(state)
        except (ValueError, RuntimeError) as exc:
            raise FileFormatError(f"ShapesWorld model weights {path}: {exc}") from None
    embedder.eval()
    model = SimilarityModel(embedder, "cosine", in_channels=3)
    return model.to(device).eval()
