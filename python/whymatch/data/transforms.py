"""The standard deep-metric-learning image transforms, without torchvision.

Train: resize the shorter side to ``resize`` (bilinear), random ``size`` x ``size``
crop, random horizontal flip (p = 0.5), float tensor in [0, 1].
Eval: resize the shorter side to ``resize``, centre ``size`` x ``size`` crop, tensor.

Images stay in [0, 1]: mean / std normalization belongs to the model
(``SimilarityModel(preprocess=...)``), so nothing here normalizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..io import pil_to_rgb, pil_to_tensor  # pil_to_tensor re-exported: whymatch.data.pil_to_tensor
from .. import _checks as V

__all__ = ["ResizeCrop", "train_transform", "eval_transform", "pil_to_tensor"]


def _shorter_side_size(h: int, w: int, resize: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side equal to ``resize`` and the aspect ratio kept."""
    if h <= w:
        return resize, max(resize, int(round(w * resize / h)))
    return max(resize, int(round(h * resize / w))), resize


class ResizeCrop:
    """Resize the shorter side, crop a square (random or centre), optionally flip, to tensor.

    Called on a PIL image (resized with PIL's bilinear filter) or on a (3, H, W)
    float tensor in [0, 1] (resized with antialiased bilinear interpolation).
    Images smaller than the crop are enlarged by the resize, so any size works.

    Args:
        size: side of the square crop in pixels (>= 1).
        resize: the shorter side is resized to this before cropping (>= size).
        train: True: random crop and random horizontal flip with probability 0.5;
            False: centre crop, no flip.
        generator: torch.Generator for the random crop and flip (reproducible);
            None uses the global torch RNG. A generator is consumed in call order;
            DataLoader workers each get a copy of the SAME state (so their crops
            repeat): for multi-worker loading use None, the global RNG, which the
            DataLoader seeds differently per worker.

    Returns (when called):
        (3, size, size) float32 in [0, 1].
    """

    def __init__(self, size: int = 224, resize: int = 256, *, train: bool = False,
                 generator: torch.Generator | None = None) -> None:
        self.size = V.positive_int("size", size)
        self.resize = V.positive_int("resize", resize)
        if self.resize < self.size:
            raise ValueError(f"resize must be >= size (the shorter side is resized to resize, then a size x size "
                             f"crop is taken), got resize={resize} and size={size}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.train = bool(train)
        self.generator = generator

    def __repr__(self) -> str:
        kind = "random crop + horizontal flip" if self.train else "centre crop"
        gen = ", generator" if self.generator is not None else ""
        return f"ResizeCrop(size={self.size}, resize={self.resize}, train={self.train}{gen}: {kind})"

    def _randint(self, high: int) -> int:
        """Uniform int in [0, high)."""
        return int(torch.randint(0, high, (1,), generator=self.generator))

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        if isinstance(image, Image.Image):
            if image.mode != "RGB":
                image = pil_to_rgb(image)  # 16-bit / float modes by their range, not clipped
            w, h = image.size
            nh, nw = _shorter_side_size(h, w, self.resize)
            x = pil_to_tensor(image.resize((nw, nh), Image.BILINEAR))
        elif isinstance(image, Tensor):
            V.tensor("image", image, ndim=3)
            if not image.is_floating_point():
                raise ValueError(f"image must be a float tensor in [0, 1], got dtype "
                                 f"{str(image.dtype).replace('torch.', '')}")
            if image.shape[0] != 3:
                raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
            h, w = image.shape[1:]
            if h == 0 or w == 0:
                raise ValueError(f"image must not be empty, got shape {tuple(image.shape)}")
            nh, nw = _shorter_side_size(h, w, self.resize)
            x = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=True)[0].clamp_(0.0, 1.0)
        else:
            raise TypeError(f"image must be a PIL.Image.Image or a (3, H, W) tensor, got {type(image).__name__}")
        s = self.size
        if self.train:
            top = self._randint(nh - s + 1)
            left = self._randint(nw - s + 1)
        else:
            top = int(round((nh - s) / 2.0))
            left = int(round((nw - s) / 2.0))
        x = x[:, top:top + s, left:left + s]
        if self.train and float(torch.rand((), generator=self.generator)) < 0.5:
            x = x.flip(-1)
        return x.contiguous()


def train_transform(size: int = 224, resize: int = 256, generator: torch.Generator | None = None) -> ResizeCrop:
    """The standard DML training transform: resize shorter side, random crop, random flip, to tensor.

    Args:
        size: crop side in pixels (224 in the DML literature).
        resize: shorter side before cropping (256).
        generator: torch.Generator for reproducible crops and flips; None uses the
            global torch RNG.

    Returns:
        A callable PIL image (or (3, H, W) tensor in [0, 1]) -> (3, size, size) float32 in [0, 1].
    """
    return ResizeCrop(size, resize, train=True, generator=generator)


def eval_transform(size: int = 224, resize: int = 256) -> ResizeCrop:
    """The standard DML evaluation transform: resize shorter side, centre crop, to tensor.

    Args:
        size: crop side in pixels (224).
        resize: shorter side before cropping (256).

    Returns:
        A callable PIL image (or (3, H, W) tensor in [0, 1]) -> (3, size, size) float32 in [0, 1].
    """
    return ResizeCrop(size, resize, train=False)
