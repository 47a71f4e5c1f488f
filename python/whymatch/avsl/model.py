"""The AVSL model (Zhang et al., "Attributable Visual Similarity Learning", CVPR 2022).

:class:`AVSL` wraps a backbone, takes its feature maps at several named layers (low to
high), and builds per level an embedding, per-node CAMs and their reliability; between
adjacent levels it keeps CAM-correlation edges (a momentum average over training
batches). The overall distance of two images is the top level's sum of similarity
nodes after top-down rectification (Eq. 7-9), computed by :mod:`whymatch.ops.avsl`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import _validate as V

__all__ = ["AVSL", "AVSLEncoding", "RELIABILITY"]

RELIABILITY = ("map", "published")


class _Stop(Exception):
    """Raised by the last feature hook: the rest of the backbone is not needed."""


@dataclass
class AVSLEncoding:
    """What :meth:`AVSL.encode` returns for a batch of B images, one entry per level (low to high).

    Attributes:
        embeddings: (B, R) float32 per level, not normalized (the nodes normalize them); with
            autograd to the network.
        reliabilities: (B, R) float32 per level, the CAM statistic eta (no gradient).
        cams: (B, R, h_l, w_l) per level (no gradient), or None when not kept.
        correlations: (R_l, R_{l+1}) per level pair, this batch's CAM correlation (training mode
            only, else None).
    """

    embeddings: list[Tensor]
    reliabilities: list[Tensor]
    cams: list[Tensor] | None = None
    correlations: list[Tensor] | None = None

    def __len__(self) -> int:
        return int(self.embeddings[0].shape[0])

    def select(self, index: Tensor | slice) -> AVSLEncoding:
        """The encoding of a subset of the images (embeddings and reliabilities only)."""
        return AVSLEncoding([e[index] for e in self.embeddings], [r[index] for r in self.reliabilities])


def linearized_input(features: Tensor) -> Tensor:
    """F + H*W*max_unpool(argmax F): the map whose 1x1 conv is a CAM with mean = the embedding.

    Each channel's maximum is moved, multiplied by H*W, to its (first) arg-max position, so
    that the spatial mean of the result is avgpool(F) + maxpool(F). (B, C, H, W) -> same.
    """
    b, c, h, w = features.shape
    flat = features.flatten(2)
    top, idx = flat.max(dim=-1, keepdim=True)
    peak = torch.zeros_like(flat).scatter_(-1, idx, top * (h * w))
    return features + peak.view(b, c, h, w)


class AVSL(nn.Module):
    """Attributable visual similarity learning on top of any backbone.

    Per level l (a module of ``backbone`` named in ``levels``, low to high), with feature
    map F_l (B, C_l, H_l, W_l):

    - embedding e_l = conv1x1_l(avgpool(F_l) + maxpool(F_l)) (B, dim), conv with bias,
      kaiming-normal (fan_out) weights and zero bias, as published;
    - CAMs M_l = conv1x1_l(F_l + H_l W_l max_unpool(argmax F_l)) on detached features, so that
      the spatial mean of M_l is e_l (the published linearization); no gradient;
    - reliability statistic eta_l = :func:`whymatch.ops.cam_reliability` of M_l (no gradient),
      and per pair p_l = sigmoid(gamma (eta_l eta_l' coef_l + bias_l)) (Eq. 9);
    - edges E_l (R_l, R_{l+1}), buffers: in training mode each :meth:`encode` sets
      E_l = corr_l on the first batch and E_l = m E_l + (1 - m) corr_l afterwards
      (:func:`whymatch.ops.cam_correlation`); eval mode leaves them unchanged.

    The backbone's own output is not used: forward hooks take the feature maps. By default
    the whole backbone runs (its head's parameters then get no gradient: remove the head for
    DDP, as :func:`whymatch.train.build_avsl_model` does). ``stop_early=True`` stops it after
    the last level (an exception raised by that level's hook), which skips the head but hides
    the last level's output from forward hooks registered after AVSL's own (Grad-CAM-style
    explainers targeting that layer then see nothing).

    Args:
        backbone: any nn.Module taking images (B, C, H, W).
        levels: names of backbone modules (``dict(backbone.named_modules())``), low to high.
        dim: nodes per level R (the published 512).
        topk: lower-level nodes kept per upper node in the rectification (the published 128).
        momentum: m of the edge update (the published 0.5).
        gamma: sharpness of the reliability sigmoid (the published 10).
        reliability: 'map' (whymatch: each CAM shifted by its minimum over the whole map) or
            'published' (the published code's minimum over the last axis only, marked FIXME
            there); see :func:`whymatch.ops.reference.avsl_cam_reliability`.
        channels: the feature channels of each level; default: found by one forward pass of a
            (1, in_channels, probe_size, probe_size) zero batch in eval mode.
        stop_early: stop the backbone after the last level (see above).

    Differences from the published code: coef/bias of the lowest level are not parameters
    (the published code creates them and never uses them; DDP would flag them unused), and
    whether the edges were initialized is a buffer (``edges_initialized``) so that a resumed
    run continues the momentum average instead of copying again.
    """

    def __init__(self, backbone: nn.Module, levels: Sequence[str] = ("layer2", "layer3", "layer4"), dim: int = 512,
                 topk: int = 128, momentum: float = 0.5, gamma: float = 10.0, reliability: str = "map", *,
                 channels: Sequence[int] | None = None, in_channels: int = 3, probe_size: int = 64,
                 stop_early: bool = False) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        if isinstance(levels, str) or not isinstance(levels, Sequence) or len(levels) < 1:
            raise ValueError(f"levels must be a sequence of at least one module name, got {levels!r}")
        modules = dict(backbone.named_modules())
        for name in levels:
            if name not in modules or name == "":
                known = ", ".join(n for n in modules if n and "." not in n)
                raise ValueError(f"levels: the backbone has no module {name!r} (top-level modules: {known})")
        if len(set(levels)) != len(levels):
            raise ValueError(f"levels must be distinct, got {list(levels)}")
        self.backbone = backbone
        self.levels = tuple(levels)
        self.dim = V.positive_int("dim", dim)
        self.topk_corr = V.positive_int("topk", topk)
        self.momentum = V.real("momentum", momentum, low=0.0, high=1.0)
        self.gamma = V.real("gamma", gamma)
        self.reliability = V.choice("reliability", reliability, RELIABILITY)
        self._captured: dict[str, Tensor] | None = None
        self.stop_early = bool(stop_early)
        self._hooks = [modules[n].register_forward_hook(partial(self._level_hook, n)) for n in self.levels]
        if channels is None:
            channels = self._probe(V.positive_int("in_channels", in_channels), V.positive_int("probe_size", probe_size))
        if len(channels) != len(self.levels):
            raise ValueError(f"channels must give one count per level ({len(self.levels)}), got {list(channels)}")
        self.channels = tuple(V.positive_int("channels[i]", int(c)) for c in channels)
        self.convs = nn.ModuleList()
        for c in self.channels:
            conv = nn.Conv2d(c, self.dim, kernel_size=1, bias=True)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out")
            nn.init.zeros_(conv.bias)
            self.convs.append(conv)
        n = len(self.levels)
        self.coef = nn.ParameterList([nn.Parameter(torch.ones(self.dim)) for _ in range(n - 1)])
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(self.dim)) for _ in range(n - 1)])
        for i in range(n - 1):
            self.register_buffer(f"edges_{i}", torch.zeros(self.dim, self.dim))
        self.register_buffer("edges_initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("_unit", torch.ones(self.dim), persistent=False)

    # ------------------------------------------------------------------ features
    def _level_hook(self, name: str, module: nn.Module, inputs: object, output: object) -> None:
        # a bound method in a partial (not a closure), so that copy.deepcopy rebinds it to the copy
        if self._captured is None:
            return
        if not isinstance(output, Tensor) or output.dim() != 4:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"levels: module {name!r} must output a (B, C, H, W) feature map, got {got}")
        self._captured[name] = output
        if self.stop_early and len(self._captured) == len(self.levels):
            raise _Stop

    def features(self, images: Tensor) -> list[Tensor]:
        """The backbone's feature maps at ``levels``, low to high: (B, C_l, H_l, W_l) each."""
        self._captured = {}
        try:
            self.backbone(images)
        except _Stop:
            pass
        finally:
            got, self._captured = self._captured, None
        missing = [n for n in self.levels if n not in got]
        if missing:
            raise ValueError(f"levels: the backbone's forward never ran module(s) {missing}")
        return [got[n] for n in self.levels]

    @torch.no_grad()
    def _probe(self, in_channels: int, size: int) -> list[int]:
        was = self.backbone.training
        self.backbone.eval()
        try:
            p = next(self.backbone.parameters(), None)
            x = torch.zeros(1, in_channels, size, size, device=p.device if p is not None else None)
            return [int(f.shape[1]) for f in self.features(x)]
        finally:
            self.backbone.train(was)

    @property
    def edges(self) -> list[Tensor]:
        """The edge buffers (R_l, R_{l+1}) per level pair, low to high."""
        return [getattr(self, f"edges_{i}") for i in range(len(self.levels) - 1)]

    def coefs(self) -> tuple[list[Tensor], list[Tensor]]:
        """coef and bias per level as ops.avsl_distance wants them (level 0: constants, unused)."""
        return [self._unit] + list(self.coef), [self._unit * 0] + list(self.bias)

    def links(self) -> list[Tensor]:
        """The rectification weights link* (R_l, R_{l+1}) from the current edges (Eq. 7-8)."""
        return [ops.link_star(e, self.topk_corr) for e in self.edges]

    # ------------------------------------------------------------------ encode
    def embed_level(self, level: int, feature: Tensor) -> Tensor:
        """e_l = conv1x1_l(avgpool(F) + maxpool(F)), (B, dim)."""
        pooled = feature.mean(dim=(2, 3), keepdim=True) + feature.amax(dim=(2, 3), keepdim=True)
        return self.convs[level](pooled).flatten(1)

    @torch.no_grad()
    def cam_level(self, level: int, feature: Tensor) -> Tensor:
        """CAMs (B, dim, H, W) of one level: conv1x1_l(F + H W max_unpool(argmax F)), no gradient."""
        return self.convs[level](linearized_input(feature.detach()))

    def encode(self, images: Tensor, *, keep_cams: bool = False) -> AVSLEncoding:
        """Embeddings, reliabilities (and CAMs) of a batch; updates the edges in training mode.

        Args:
            images: (B, C, H, W) input of the backbone.
            keep_cams: also return the CAMs.
        """
        images = V.tensor("images", images, ndim=4, nonempty=True)
        feats = self.features(images)
        embs = [self.embed_level(i, f) for i, f in enumerate(feats)]
        published = self.reliability == "published"
        with torch.no_grad():
            cams = [self.cam_level(i, f).float() for i, f in enumerate(feats)]
            corrs = None
            if self.training and self.edges:
                # one fused pass per level pair: correlation, edge update and both levels' reliability
                first = not bool(self.edges_initialized)
                rels, corrs = [None] * len(cams), []
                for i, e in enumerate(self.edges):
                    corr, rel_low, rel_high = ops.cam_statistics(cams[i], cams[i + 1], edges=e,
                                                                 momentum=self.momentum, first=first,
                                                                 published=published)
                    rels[i] = rel_low if rels[i] is None else rels[i]
                    rels[i + 1] = rel_high
                    corrs.append(corr)
                self.edges_initialized.fill_(True)
            else:
                rels = [ops.cam_reliability(c, published=published) for c in cams]
        return AVSLEncoding([e.float() for e in embs], rels, cams if keep_cams else None, corrs)

    def forward(self, images: Tensor) -> Tensor:
        """Concatenated l2-normalized level embeddings (B, L * dim): a plain embedding for
        :class:`whymatch.SimilarityModel` (cosine on it = mean of the levels' cosines). AVSL's
        own distance is :meth:`distance`."""
        enc = self.encode(images)
        n = len(enc.embeddings)
        return torch.cat([F.normalize(e, dim=1) for e in enc.embeddings], dim=1) / n ** 0.5

    # ------------------------------------------------------------------ distances
    @staticmethod
    def _check_pair(query: AVSLEncoding, gallery: AVSLEncoding) -> None:
        for name, enc in (("query", query), ("gallery", gallery)):
            if not isinstance(enc, AVSLEncoding):
                raise TypeError(f"{name} must be an AVSLEncoding (from AVSL.encode), got {type(enc).__name__}")
        if len(query.embeddings) != len(gallery.embeddings):
            raise ValueError(f"gallery must have the query's {len(query.embeddings)} levels, "
                             f"got {len(gallery.embeddings)}")

    def level_distances(self, query: AVSLEncoding, gallery: AVSLEncoding) -> list[Tensor]:
        """Per-level distance matrices (Q, G): sum over nodes of (norm(e_q) - norm(e_g))^2.

        Differentiable: these train the network (the published per-level losses).
        """
        self._check_pair(query, gallery)
        out = []
        for q, g in zip(query.embeddings, gallery.embeddings):
            qn, gn = F.normalize(q, dim=-1), F.normalize(g, dim=-1)
            out.append(((qn[:, None, :] - gn[None, :, :]) ** 2).sum(dim=-1))
        return out

    def distance(self, query: AVSLEncoding, gallery: AVSLEncoding) -> Tensor:
        """Overall AVSL distance (Q, G) float32 (Eq. 7-9), differentiable in coef and bias only."""
        self._check_pair(query, gallery)
        coef, bias = self.coefs()
        return ops.avsl_distance([e.detach() for e in query.embeddings], [e.detach() for e in gallery.embeddings],
                                 query.reliabilities, gallery.reliabilities, self.links(), coef, bias, self.gamma)

    @torch.no_grad()
    def topk(self, query: AVSLEncoding, gallery: AVSLEncoding, k: int, *,
             exclude_self: bool = False) -> tuple[Tensor, Tensor]:
        """Each query's k nearest gallery items: ((Q, k) distances ascending, (Q, k) int64 indices)."""
        self._check_pair(query, gallery)
        coef, bias = self.coefs()
        return ops.avsl_topk([e.detach() for e in query.embeddings], [e.detach() for e in gallery.embeddings],
                             query.reliabilities, gallery.reliabilities, self.links(), coef, bias, self.gamma, k,
                             exclude_self=exclude_self)

    def explain(self, x1: Tensor, x2: Tensor, top: int = 5, *, by: str = "lambda"):
        """Top contributing nodes per level for the pair (x1, x2) with their CAMs; see
        :func:`whymatch.avsl.explain.explain_pair`."""
        from .explain import explain_pair

        return explain_pair(self, x1, x2, top=top, by=by)
