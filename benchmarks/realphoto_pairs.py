"""Pairs of real photographs that share one object, built offline from the photos scikit-image bundles.

Objects are rectangles cut from the bundled photos (a face, a cup, a rocket, ...);
each pair pastes one shared object into two different background photos at random
places and scales, plus distractor objects that the two images do not share. The
shared object's box in the query is the ground truth: a similarity model that
matches the pair for the right reason matches it on that object.

Only photos that load without a download are used (``skimage.data``'s bundled
files). Objects and backgrounds are split in two disjoint sets: 'val' to choose
settings, 'test' to report once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# name: (photo, (y0, x0, y1, x1) as fractions of the photo)
OBJECTS = {
    "val": {
        "astronaut_face": ("astronaut", (0.04, 0.26, 0.46, 0.60)),
        "helmet": ("astronaut", (0.62, 0.55, 1.00, 1.00)),
        "coins": ("coins", (0.00, 0.00, 0.50, 0.75)),
        "colorwheel": ("colorwheel", (0.05, 0.05, 0.95, 0.95)),
        "cell": ("cell", (0.55, 0.45, 0.95, 0.90)),
        "retina": ("retina", (0.10, 0.10, 0.90, 0.90)),
    },
    "test": {
        "cat_face": ("chelsea", (0.00, 0.15, 1.00, 0.85)),
        "coffee_cup": ("coffee", (0.00, 0.05, 0.95, 0.85)),
        "rocket": ("rocket", (0.10, 0.30, 1.00, 0.60)),
        "cameraman": ("camera", (0.05, 0.10, 1.00, 0.70)),
        "logo": ("logo", (0.00, 0.00, 1.00, 1.00)),
        "motorcycle": ("stereo_motorcycle", (0.05, 0.05, 0.95, 0.95)),
        "shuttle": ("astronaut", (0.00, 0.68, 0.55, 0.92)),
    },
}
BACKGROUNDS = {
    "val": ("grass", "brick", "page", "moon"),
    "test": ("gravel", "hubble_deep_field", "immunohistochemistry", "clock"),
}
SPLITS = tuple(OBJECTS)


def load_photo(name: str) -> Tensor:
    """A bundled scikit-image photo as a (3, H, W) float32 tensor in [0, 1] (grey replicated, alpha on white)."""
    import skimage.data

    x = getattr(skimage.data, name)()
    if isinstance(x, tuple):  # stereo pairs: the left image
        x = x[0]
    x = np.asarray(x)
    if x.dtype == bool:
        x = x.astype(np.float32)
    elif x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32)
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    if x.ndim == 2:
        x = np.stack([x] * 3, axis=-1)
    if x.shape[-1] == 4:
        a = x[..., 3:]
        x = x[..., :3] * a + (1.0 - a)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).contiguous()


def _resize(img: Tensor, h: int, w: int) -> Tensor:
    return F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)


def _to8(img: Tensor) -> Tensor:
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _crop(img: Tensor, box: tuple[float, float, float, float]) -> Tensor:
    _, h, w = img.shape
    y0, x0, y1, x1 = box
    return img[:, int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)]


@dataclass
class Pair:
    """One pair: query and reference (3, S, S) in [0, 1], the shared object's box mask in the query (S, S)
    bool, and what was pasted where."""

    query: Tensor
    reference: Tensor
    query_mask: Tensor
    reference_mask: Tensor
    shared: str
    query_distractors: list[str]
    reference_distractors: list[str]
    backgrounds: tuple[str, str]


class _Scene:
    def __init__(self, background: Tensor, size: int) -> None:
        self.image = background.clone()
        self.size = size
        self.taken = torch.zeros(size, size, dtype=torch.bool)

    def paste(self, obj: Tensor, scale: float, rng: np.random.Generator) -> Tensor | None:
        """Paste ``obj`` with its longer side ``scale`` x size where it overlaps nothing pasted; its mask."""
        _, oh, ow = obj.shape
        long = max(oh, ow)
        h = max(4, round(oh / long * scale * self.size))
        w = max(4, round(ow / long * scale * self.size))
        for _ in range(200):
            y = int(rng.integers(0, self.size - h + 1))
            x = int(rng.integers(0, self.size - w + 1))
            if not self.taken[max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2].any():
                self.image[:, y:y + h, x:x + w] = _resize(obj, h, w)
                mask = torch.zeros(self.size, self.size, dtype=torch.bool)
                mask[y:y + h, x:x + w] = True
                self.taken |= mask
                return mask
        return None


def make_pairs(split: str, n_pairs: int, size: int = 128, *, seed: int = 0, n_distractors: int = 2,
               scale: tuple[float, float] = (0.3, 0.45), cache: str | None = None) -> list[Pair]:
    """``n_pairs`` pairs of ``split`` ('val' or 'test'), images ``size`` x ``size``.

    The shared object cycles through the split's objects; its scale (longer side as a
    fraction of the image side) is drawn from ``scale`` independently in the two images,
    and so are the places. Each image gets ``n_distractors`` other objects of the split,
    none shared between the two images, and a different background photo of the split
    (a random crop of it).
    """
    if split not in OBJECTS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cache is not None:  # a folder of pairs built earlier (e.g. on a machine whose scikit-image lacks a photo)
        import os

        path = os.path.join(cache, f"{split}_{n_pairs}_{size}_{seed}_{n_distractors}_{scale[0]}_{scale[1]}.pt")
        if os.path.exists(path):
            out = []
            for d in torch.load(path, weights_only=True):
                d["query"], d["reference"] = d["query"].float() / 255, d["reference"].float() / 255
                out.append(Pair(**d))
            return out
        pairs = make_pairs(split, n_pairs, size, seed=seed, n_distractors=n_distractors, scale=scale)
        os.makedirs(cache, exist_ok=True)
        torch.save([dict(vars(p), query=_to8(p.query), reference=_to8(p.reference)) for p in pairs], path)
        return pairs
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    photos: dict[str, Tensor] = {}

    def photo(name: str) -> Tensor:
        if name not in photos:
            photos[name] = load_photo(name)
        return photos[name]

    objects = {k: _crop(photo(p), box) for k, (p, box) in OBJECTS[split].items()}
    names = list(objects)
    bgs = BACKGROUNDS[split]
    pairs = []
    for i in range(n_pairs):
        shared = names[i % len(names)]
        others = [n for n in names if n != shared]
        rng.shuffle(others)
        dq, dr = others[:n_distractors], others[n_distractors:2 * n_distractors]
        b = rng.choice(len(bgs), size=2, replace=False)
        images, masks = [], []
        for bg_name, distract in ((bgs[b[0]], dq), (bgs[b[1]], dr)):
            bg = photo(bg_name)
            side = min(bg.shape[1:])
            y = int(rng.integers(0, bg.shape[1] - side + 1))
            x = int(rng.integers(0, bg.shape[2] - side + 1))
            scene = _Scene(_resize(bg[:, y:y + side, x:x + side], size, size), size)
            mask = scene.paste(objects[shared], float(rng.uniform(*scale)), rng)
            for d in distract:
                scene.paste(objects[d], float(rng.uniform(*scale)), rng)
            images.append(scene.image)
            masks.append(mask)
        # 8-bit images, as a saved photo would be (and as the pairs cache stores them)
        images = [_to8(x).float() / 255 for x in images]
        pairs.append(Pair(images[0], images[1], masks[0], masks[1], shared, dq, dr,
                          (bgs[b[0]], bgs[b[1]])))
    return pairs
