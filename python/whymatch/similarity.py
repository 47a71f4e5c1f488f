"""SimilarityModel: an embedding network plus a similarity function.

Every explainer, metric and trainer in whymatch takes a SimilarityModel, so a
retrieval system's own network plugs in without changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as V

__all__ = ["SimilarityModel", "pairwise_similarity"]

SimilarityFn = Callable[[Tensor, Tensor], Tensor]
ConditionalFn = Callable[[Tensor, Tensor, object], Tensor]


def pairwise_similarity(a: Tensor, b: Tensor, kind: str = "cosine") -> Tensor:
    """(Na, Nb) similarity between two embedding batches: 'cosine', 'dot' or 'neg_l2'."""
    a, b = a.float(), b.float()
    if kind == "cosine":
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    if kind == "dot":
        return a @ b.T
    if kind == "neg_l2":
        return -torch.cdist(a, b)
    raise ValueError(f"similarity must be 'cosine', 'dot', 'neg_l2' or a callable, got {kind!r}")


class SimilarityModel(nn.Module):
    """Wraps an embedding network and a similarity function.

    Args:
        embedder: any module mapping images (B, C, H, W) to embeddings (B, D)
            (a (B, D, 1, 1) output is flattened).
        similarity: 'cosine' (default), 'dot', 'neg_l2', or a callable
            ``f(a, b) -> (Na, Nb)`` on two embedding batches a (Na, D), b (Nb, D).
        preprocess: optional callable applied to images before the embedder
            (e.g. mean/std normalization), so that explainers perturb images in
            their natural [0, 1] space.
        conditional_similarity: optional callable ``f(a, b, condition) -> (Na, Nb)``
            for models whose similarity depends on the pair (as type-aware
            fashion models project a top and a shoe into a type-specific space).
            When given, every similarity call must pass ``condition``.
        autocast: None, torch.float16 or torch.bfloat16: run the embedder under
            autocast on CUDA (ignored on CPU, where it would be slower).
        channels_last: feed the embedder channels_last batches.
        in_channels: the channel count the embedder expects (checked by explainers).
    """

    def __init__(self, embedder: nn.Module, similarity: str | SimilarityFn = "cosine", *,
                 preprocess: Callable[[Tensor], Tensor] | None = None,
                 conditional_similarity: ConditionalFn | None = None,
                 autocast: torch.dtype | None = None, channels_last: bool = False,
                 in_channels: int | None = 3) -> None:
        super().__init__()
        if not isinstance(embedder, nn.Module):
            raise TypeError(f"embedder must be a torch.nn.Module, got {type(embedder).__name__}")
        if not (callable(similarity) or similarity in ("cosine", "dot", "neg_l2")):
            raise ValueError(f"similarity must be 'cosine', 'dot', 'neg_l2' or a callable, got {similarity!r}")
        if autocast not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"autocast must be None, torch.float16 or torch.bfloat16, got {autocast}")
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be callable, got {type(preprocess).__name__}")
        if conditional_similarity is not None and not callable(conditional_similarity):
            raise TypeError(f"conditional_similarity must be callable, got {type(conditional_similarity).__name__}")
        self.embedder = embedder
        self.similarity_fn = similarity
        self.preprocess = preprocess
        self.conditional_similarity = conditional_similarity
        self.autocast = autocast
        self.channels_last = bool(channels_last)
        self.in_channels = in_channels

    # ------------------------------------------------------------------ info
    @property
    def device(self) -> torch.device:
        for t in self.embedder.parameters():
            return t.device
        for t in self.embedder.buffers():
            return t.device
        return torch.device("cpu")

    def input_dtype(self, device: torch.device | None = None) -> torch.dtype:
        """The dtype in which explainers should build perturbed batches on ``device``."""
        device = self.device if device is None else device
        if self.autocast is not None and device.type == "cuda":
            return self.autocast
        return torch.float32

    # ----------------------------------------------------------- embeddings
    def _autocast_ctx(self, device: torch.device):
        if self.autocast is not None and device.type == "cuda":
            return torch.autocast("cuda", dtype=self.autocast)
        return contextlib.nullcontext()

    def forward(self, images: Tensor) -> Tensor:
        """Embeddings (B, D) float32 of images (B, C, H, W), with autograd."""
        x = images
        if self.preprocess is not None:
            x = self.preprocess(x)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast_ctx(x.device):
            e = self.embedder(x)
        if not isinstance(e, Tensor):
            raise TypeError(f"embedder must return a (B, D) tensor of embeddings, got {type(e).__name__}")
        if e.dim() == 4 and e.shape[2:] == (1, 1):
            e = e.flatten(1)
        if e.dim() != 2:
            raise ValueError(f"embedder must return (B, D) embeddings, got shape {tuple(e.shape)}")
        if isinstance(x, Tensor) and x.dim() >= 1 and e.shape[0] != x.shape[0]:
            raise ValueError(f"embedder must return one embedding per image: {x.shape[0]} images gave "
                             f"{e.shape[0]} embeddings (shape {tuple(e.shape)})")
        if not (e.is_floating_point() or e.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise ValueError(f"embedder must return real-valued embeddings, got dtype {e.dtype}")
        return e.float()

    def check_images(self, name: str, images: object, *, batch: bool = True,
                     device: torch.device | None = None) -> Tensor:
        """Validate an image batch (B, C, H, W) (or one image (C, H, W) when batch=False).

        Checks the type, rank, dtype, device (when given), channel count, emptiness and finiteness.
        """
        images = V.tensor(name, images, ndim=4 if batch else 3, dtypes=V.FLOAT_DTYPES, nonempty=True)
        if device is not None and images.device != device:
            raise ValueError(f"{name} must be on the model's device {device}, got {images.device}")
        ch = images.shape[1 if batch else 0]
        if self.in_channels is not None and ch != self.in_channels:
            raise ValueError(f"{name} must have {self.in_channels} channels, got {ch} (shape {tuple(images.shape)})")
        # scanned here, once per call, whatever the ops' own checks do
        if not bool(torch.isfinite(images).all()):
            bad = int((~torch.isfinite(images)).sum())
            raise ValueError(f"{name} must be finite, got {bad} NaN or infinite value(s) in shape "
                             f"{tuple(images.shape)}")
        return images

    @torch.no_grad()
    def embed(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """Embeddings (B, D) float32 of images (B, C, H, W), batched, without gradients."""
        images = self.check_images("images", images)
        if batch_size is None or batch_size >= images.shape[0]:
            return self.forward(images)
        V.positive_int("batch_size", batch_size)
        return torch.cat([self.forward(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])

    # ----------------------------------------------------------- similarity
    def pairwise(self, a: Tensor, b: Tensor, condition: object = None) -> Tensor:
        """Similarity (Na, Nb) between embedding batches a (Na, D) and b (Nb, D)."""
        if self.conditional_similarity is not None:
            if condition is None:
                raise ValueError("condition must be given: this SimilarityModel has a conditional_similarity")
            out = self.conditional_similarity(a, b, condition)
        elif condition is not None:
            raise ValueError("condition was given but this SimilarityModel has no conditional_similarity")
        elif callable(self.similarity_fn):
            out = self.similarity_fn(a, b)
        else:
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
                raise ValueError(f"embeddings must be (N, D) batches of one dimension D to compare, got shapes "
                                 f"{tuple(a.shape)} and {tuple(b.shape)} (are reference_embeddings from this model?)")
            out = pairwise_similarity(a, b, self.similarity_fn)
        if not isinstance(out, Tensor) or out.shape != (a.shape[0], b.shape[0]):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the similarity function must return shape ({a.shape[0]}, {b.shape[0]}), got {got}")
        return out.float()

    @torch.no_grad()
    def similarity(self, x1: Tensor, x2: Tensor, condition: object = None) -> Tensor:
        """Similarity (B,) of image pairs x1[i], x2[i], each (B, C, H, W)."""
        x1 = self.check_images("x1", x1)
        x2 = self.check_images("x2", x2)
        if x1.shape[0] != x2.shape[0]:
            raise ValueError(f"x1 and x2 must hold the same number of images, got {x1.shape[0]} and {x2.shape[0]}")
        e1, e2 = self.forward(x1), self.forward(x2)
        return torch.stack([self.pairwise(e1[i:i + 1], e2[i:i + 1], condition)[0, 0] for i in range(e1.shape[0])])
