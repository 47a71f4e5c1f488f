"""AVSL training losses (Eq. 10): per-level metric losses train the network, the loss on the
overall (rectified) distance trains only the reliability parameters coef and bias.

The metric losses here take a distance matrix, as the published code's do: the AVSL
distances are not a function of one embedding per image, so pytorch-metric-learning's
embedding losses do not apply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops import _validate as V
from .model import AVSL, AVSLEncoding

__all__ = ["proxy_anchor_distance", "ProxyAnchorDistanceLoss", "MarginDistanceLoss", "AVSLLoss", "AVSLLossOutput",
           "AVSL_LOSSES", "DEFAULT_WEIGHTS"]

AVSL_LOSSES = ("proxyanchor", "margin")
#: Per-level loss weights (low to high) for three levels. The published collector's constructor
#: defaults are 0.1 / 0.2 / 0.4, but its entry point (examples/demo.py, args.csv) passes
#: 1.0 / 0.2 / 1.0 unless told otherwise, and the published runs use 0.5 / 1 / 0.5 (CUB) and
#: 1 / 4 / 4 (Cars196, SOP). whymatch defaults to the entry point's values.
DEFAULT_WEIGHTS = (1.0, 0.2, 1.0)


def _masks(dist: Tensor, row_labels: Tensor, col_labels: Tensor, same_source: bool) -> tuple[Tensor, Tensor]:
    dist = V.tensor("dist", dist, ndim=2, nonempty=True)
    row_labels = V.tensor("row_labels", row_labels, ndim=1, device=dist.device)
    col_labels = V.tensor("col_labels", col_labels, ndim=1, device=dist.device)
    if row_labels.shape[0] != dist.shape[0] or col_labels.shape[0] != dist.shape[1]:
        raise ValueError(f"row_labels ({row_labels.shape[0]}) and col_labels ({col_labels.shape[0]}) must match "
                         f"dist's shape {tuple(dist.shape)}")
    pos = row_labels[:, None] == col_labels[None, :]
    neg = ~pos
    if same_source:
        if dist.shape[0] != dist.shape[1]:
            raise ValueError(f"same_source needs a square dist, got {tuple(dist.shape)}")
        pos.fill_diagonal_(False)
    return pos, neg


def _log1p_sum_exp(x: Tensor, keep: Tensor) -> Tensor:
    """Per column: log(1 + sum over kept rows of exp(x)); 0 for a column with nothing kept."""
    x = x.masked_fill(~keep, float("-inf"))
    x = torch.cat([x, x.new_zeros(1, x.shape[1])], dim=0)
    return torch.logsumexp(x, dim=0)


def proxy_anchor_distance(dist: Tensor, row_labels: Tensor, col_labels: Tensor, *, alpha: float = 16.0,
                          pos_margin: float = 1.8, neg_margin: float = 2.2, same_source: bool = False) -> Tensor:
    """ProxyAnchor on a distance matrix, with the columns as anchors (proxies, or the batch itself).

    pos_j = log(1 + sum_{i: y_i = c_j} exp(alpha (d_ij - pos_margin))),
    neg_j = log(1 + sum_{i: y_i != c_j} exp(-alpha (d_ij - neg_margin))),
    loss = mean of pos_j over the columns with a positive + mean of neg_j over all columns,
    as the published ProxyAnchorLoss.compute_loss (Kim et al. 2020 with distances).

    Args:
        dist: (Q, G) distances; row_labels (Q,), col_labels (G,) int.
        same_source: the columns are the rows (in-batch anchors): a row is not its own positive.
    Returns:
        () scalar.
    """
    pos, neg = _masks(dist, row_labels, col_labels, same_source)
    pos_term = _log1p_sum_exp(alpha * (dist - pos_margin), pos)
    neg_term = _log1p_sum_exp(-alpha * (dist - neg_margin), neg)
    with_pos = pos.any(dim=0)
    pos_loss = pos_term[with_pos].mean() if bool(with_pos.any()) else (dist * 0).sum()
    return pos_loss + neg_term.mean()


class ProxyAnchorDistanceLoss(nn.Module):
    """:func:`proxy_anchor_distance` as a module (no parameters; the proxies live in :class:`AVSLLoss`)."""

    def __init__(self, alpha: float = 16.0, pos_margin: float = 1.8, neg_margin: float = 2.2) -> None:
        super().__init__()
        self.alpha = V.real("alpha", alpha, low=0, open_low=True)
        self.pos_margin = V.real("pos_margin", pos_margin)
        self.neg_margin = V.real("neg_margin", neg_margin)

    def forward(self, dist: Tensor, row_labels: Tensor, col_labels: Tensor, same_source: bool = False) -> Tensor:
        return proxy_anchor_distance(dist, row_labels, col_labels, alpha=self.alpha, pos_margin=self.pos_margin,
                                     neg_margin=self.neg_margin, same_source=same_source)


class MarginDistanceLoss(nn.Module):
    """Margin loss (Wu et al. 2017) on a distance matrix with a learnable boundary beta.

    pos: relu(d - beta + margin), neg: relu(beta - d + margin), averaged over the non-zero
    terms (pytorch-metric-learning's convention). The published AVSL-margin setting adds a
    hard-pair selector, which whymatch does not reproduce.
    """

    def __init__(self, margin: float = 0.2, beta: float = 1.2, learn_beta: bool = True) -> None:
        super().__init__()
        self.margin = V.real("margin", margin, low=0)
        b = torch.tensor(V.real("beta", beta))
        self.beta = nn.Parameter(b) if learn_beta else nn.Parameter(b, requires_grad=False)

    def forward(self, dist: Tensor, row_labels: Tensor, col_labels: Tensor, same_source: bool = False) -> Tensor:
        pos, neg = _masks(dist, row_labels, col_labels, same_source)
        if same_source:
            neg = neg.clone().fill_diagonal_(False)
        terms = torch.cat([torch.relu(dist - self.beta + self.margin)[pos],
                           torch.relu(self.beta - dist + self.margin)[neg]])
        n = int((terms > 0).sum())
        return terms.sum() / max(n, 1)


@dataclass
class AVSLLossOutput:
    """Total loss and its parts (for the Trainer's log)."""

    total: Tensor
    overall: Tensor
    levels: list[Tensor]

    def parts(self) -> dict[str, float]:
        out = {"loss": float(self.total.detach()), "loss_overall": float(self.overall.detach())}
        out.update({f"loss_level{i}": float(v.detach()) for i, v in enumerate(self.levels)})
        return out


def _avsl_of(model: nn.Module) -> tuple[AVSL, object]:
    import contextlib

    from ..similarity import SimilarityModel

    if isinstance(model, SimilarityModel):
        ctx = model._autocast_ctx(model.device)
        model = model.embedder
    else:
        ctx = contextlib.nullcontext()
    if not isinstance(model, AVSL):
        raise TypeError(f"model must be an AVSL (or a SimilarityModel wrapping one), got {type(model).__name__}")
    return model, ctx


class AVSLLoss(nn.Module):
    """AVSL's Eq. 10: L = L(overall distance) + sum_l w_l L(level-l distance).

    The level distances (sum of the nodes) carry gradients to the network; the overall
    distance treats the nodes as constants, so its loss trains only coef and bias. With
    ``use_proxy`` (what every published AVSL run does) the columns are one learnable proxy per
    class and level (initialized as the published code: kaiming-normal, a = sqrt(5)), whose
    reliabilities are the batch's mean reliability of that level; without, the batch itself.
    With more than ``proxy_subset`` classes only the batch's classes' proxies are used (as
    published, with 1000).

    Args:
        n_classes: training classes (labels are 0..n_classes-1); needed with use_proxy.
        levels, dim: the AVSL model's level count and nodes per level.
        loss: 'proxyanchor' (alpha 16, margins 1.8 / 2.2 as published) or 'margin'.
        weights: w_l per level, low to high (default :data:`DEFAULT_WEIGHTS` for 3 levels, else ones).
        use_proxy: proxies as columns (default) or in-batch.
        alpha, pos_margin, neg_margin: ProxyAnchor's scale and margins of the level losses (the
            published ``--pa_*``); overall_alpha / overall_pos_margin / overall_neg_margin: of the
            overall distance's loss (the published ``--final_pa_*``), by default the same. The
            published SOP run uses neg_margin 2.4 for the levels and 2.2 overall.
        margin, beta: the margin loss's (loss='margin'), for every loss.
    Call: ``loss(model, images, labels)`` with model an AVSL or a SimilarityModel wrapping one;
        returns :class:`AVSLLossOutput`. In training mode the call updates the model's edges.
    """

    def __init__(self, n_classes: int | None = None, levels: int = 3, dim: int = 512, *, loss: str = "proxyanchor",
                 weights: Sequence[float] | None = None, use_proxy: bool = True, alpha: float = 16.0,
                 pos_margin: float = 1.8, neg_margin: float = 2.2, margin: float = 0.2, beta: float = 1.2,
                 proxy_subset: int = 1000, overall_alpha: float | None = None,
                 overall_pos_margin: float | None = None, overall_neg_margin: float | None = None) -> None:
        super().__init__()
        self.n_levels = V.positive_int("levels", levels)
        self.dim = V.positive_int("dim", dim)
        self.kind = V.choice("loss", loss, AVSL_LOSSES)
        if weights is None:
            weights = DEFAULT_WEIGHTS if self.n_levels == 3 else (1.0,) * self.n_levels
        if len(weights) != self.n_levels:
            raise ValueError(f"weights must give one weight per level ({self.n_levels}), got {list(weights)}")
        self.weights = tuple(V.real("weights[i]", float(w), low=0) for w in weights)
        self.use_proxy = bool(use_proxy)
        self.proxy_subset = V.positive_int("proxy_subset", proxy_subset)

        def pick(v, default):
            return default if v is None else v

        for name, v in (("overall_alpha", overall_alpha), ("overall_pos_margin", overall_pos_margin),
                        ("overall_neg_margin", overall_neg_margin)):
            if v is not None:
                V.real(name, v, low=0 if name == "overall_alpha" else None, open_low=name == "overall_alpha")

        def make(overall: bool) -> nn.Module:
            if self.kind == "proxyanchor":
                if overall:
                    return ProxyAnchorDistanceLoss(pick(overall_alpha, alpha), pick(overall_pos_margin, pos_margin),
                                                   pick(overall_neg_margin, neg_margin))
                return ProxyAnchorDistanceLoss(alpha, pos_margin, neg_margin)
            return MarginDistanceLoss(margin, beta)

        self.level_losses = nn.ModuleList([make(False) for _ in range(self.n_levels)])
        self.overall_loss = make(True)
        self.n_classes = None
        if self.use_proxy:
            if n_classes is None:
                raise ValueError("n_classes must be given with use_proxy=True")
            self.n_classes = V.positive_int("n_classes", n_classes)
            self.proxies = nn.ParameterList()
            for _ in range(self.n_levels):
                p = torch.empty(self.n_classes, self.dim)
                nn.init.kaiming_normal_(p, a=math.sqrt(5))
                self.proxies.append(nn.Parameter(p))

    def columns(self, enc: AVSLEncoding, labels: Tensor) -> tuple[AVSLEncoding, Tensor, bool]:
        """(column encoding, column labels, same_source) for a batch's encoding."""
        if not self.use_proxy:
            return enc, labels, True
        if self.n_classes > self.proxy_subset:
            cols = torch.unique(labels)
        else:
            cols = torch.arange(self.n_classes, device=labels.device)
        embs = [p[cols] for p in self.proxies]
        rels = [torch.ones_like(e).detach() * r.mean() for e, r in zip(embs, enc.reliabilities)]
        return AVSLEncoding(embs, rels), cols, False

    def forward(self, model: nn.Module, images: Tensor, labels: Tensor) -> AVSLLossOutput:
        avsl, ctx = _avsl_of(model)
        labels = V.tensor("labels", labels, ndim=1)
        if labels.is_floating_point():
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must hold one label per image ({images.shape[0]}), got {labels.shape[0]}")
        if len(avsl.levels) != self.n_levels or avsl.dim != self.dim:
            raise ValueError(f"model has {len(avsl.levels)} levels of {avsl.dim} nodes; this loss was built for "
                             f"levels={self.n_levels}, dim={self.dim}")
        if self.use_proxy and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
            raise ValueError(f"labels must be in [0, n_classes={self.n_classes}), got [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        with ctx:
            enc = avsl.encode(images)
        cols, col_labels, same = self.columns(enc, labels)
        level_d = avsl.level_distances(enc, cols)
        overall = self.overall_loss(avsl.distance(enc, cols), labels, col_labels, same)
        levels = [f(d, labels, col_labels, same) for f, d in zip(self.level_losses, level_d)]
        total = overall + sum(w * lv for w, lv in zip(self.weights, levels))
        return AVSLLossOutput(total, overall, levels)
