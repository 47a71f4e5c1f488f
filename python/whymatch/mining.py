"""Similarity mining (Zheng et al., "Towards Visually Explaining Similarity Models", sec. 2.2-2.3).

Training with explanations in the loop: the similarity attention of each anchor
(:class:`whymatch.saliency.SimilarityAttention`, kept differentiable) says which
regions make its tuple (dis)similar; those regions are erased softly and the
erased anchor is embedded again by the same network. If the attention covered
everything that makes the anchor resemble its positive, the erased anchor no
longer prefers the positive over the negative. L_sm asks for exactly that, so
the network learns attention that covers all of the evidence, and the total is

    L = L_ml + gamma * L_sm

with L_ml any pytorch-metric-learning loss (contrastive, triplet, margin,
ProxyAnchor, ...) on the embeddings of the batch, not rewritten here.

The soft mask is :func:`whymatch.ops.soft_mask` (paper Eq. 1):

    T(A) = sigmoid(alpha * (A - beta)),    x* = x - x * T(A)

Equations of L_sm, with d(u, v) = ||u/|u| - v/|v|||_2 the Euclidean distance of
unit-normalized embeddings and f* the embedding of the erased anchor:

==========  ===============  ===================================================
mode        tuple            L_sm (mean over the tuples)
==========  ===============  ===================================================
siamese     (x1, x2) pos.    | d(f1*, f2) - m |
triplet     (a, p, n)        | d(fa*, fp) - d(fa*, fn) |                (Eq. 2)
quadruplet  (a, p, n1, n2)   | d(fa*, fp) - d(fa*, fn1) | + | d(fa*, fp) - d(fn1, fn2) |
==========  ===============  ===================================================

Sources and choices (the full text of the paper could not be re-read while this
was written; these follow the paper as the authors of whymatch understood it):

- Triplet (Eq. 2): once the anchor's attended regions are gone, the anchor should
  be as far from its positive as from its negative. Only the anchor is erased.
- Siamese: positive pairs only (the attention of a positive pair is what the
  pair shares); the erased image should sit at the margin m between "similar"
  and "dissimilar" (default m = 1.0, the ``neg_margin`` of pytorch-metric-learning's
  ContrastiveLoss on unit embeddings).
- Quadruplet: the two ranking constraints of the quadruplet loss (Chen et al.
  2017), a-p vs a-n1 and a-p vs n1-n2, each turned into the same equality.
- alpha = 10, beta = 0.5: GAIN's soft-mask values (Li et al. 2018, whose soft
  mask the paper adopts); gamma = 1 by default (a choice; the ShapesWorld
  experiment in benchmarks/ records the value it used).
- Normalization before the threshold: each map is divided by its maximum
  (``normalize='max'``, Grad-CAM / GAIN convention; maps are >= 0 after the ReLU
  so this puts them in [0, 1] and keeps 0 at 0); ``'minmax'`` subtracts the
  minimum first. The normalization is differentiable (the max carries gradient).

How the maps are computed: from the SAME forward pass that gives L_ml its
embeddings (activations of the target layer captured by a hook), with
SimilarityAttention's definition: w = similarity_weights(mode, unit embeddings
of the tuple, detached), score = w . f_anchor, map = ReLU(sum_c mean(d score /
d A_c) A_c) with ``create_graph=True``, so the map is a differentiable function
of the network's parameters. The low-resolution map (h x w of the target layer)
goes to soft_mask, which upsamples it itself. In eval mode these maps equal
``SimilarityAttention(...).attribute_tuples(...)[0]`` before upsampling (tested).

BatchNorm: SimilarityAttention warns in training mode because BatchNorm mixes
the images of a batch. Here that is intended: the maps explain the embeddings
the metric loss is trained on, which are computed with batch statistics, so no
warning is raised. The erased anchors are embedded in training mode too, but
with the BatchNorm running statistics frozen for that pass (momentum 0), so
erased images never leak into the statistics used at test time.

Tuples: every image anchors at most one tuple (so each anchor has one map, as
SimilarityAttention gives one map per tuple). Without a miner, the tuple of
anchor i is its farthest positive and nearest negative in the batch ("batch
hard", Hermans et al. 2017; for quadruplets n2 is the nearest image to n1 of a
third class). With a pytorch-metric-learning miner, its tuples are used (pairs
are converted to triplets), the first tuple of each anchor kept.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import _validate as V
from .ops import soft_mask
from .saliency import _cam
from .saliency.attention import TUPLE_SIZES, similarity_weights
from .similarity import SimilarityModel

__all__ = ["SimilarityMiningLoss", "MiningLossOutput", "similarity_mining_loss", "mine_tuples", "MODES"]

MODES = tuple(TUPLE_SIZES)
NORMALIZATIONS = ("max", "minmax")


class MiningLossOutput(NamedTuple):
    """What :class:`SimilarityMiningLoss` returns: the total and its parts (scalars with graph)."""

    total: Tensor
    metric: Tensor
    mining: Tensor
    n_tuples: int

    def parts(self) -> dict[str, float]:
        """Python numbers for logging: loss, metric_loss, mining_loss, n_tuples."""
        return {"loss": float(self.total.detach()), "metric_loss": float(self.metric.detach()),
                "mining_loss": float(self.mining.detach()), "n_tuples": self.n_tuples}


def _dist(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise Euclidean distance of unit-normalized embeddings (N, D) -> (N,), safe gradient at 0."""
    d2 = (F.normalize(u.float(), dim=1) - F.normalize(v.float(), dim=1)).pow(2).sum(dim=1)
    return (d2 + 1e-12).sqrt()


def similarity_mining_loss(mode: str, masked_anchor: Tensor, members: list[Tensor] | tuple[Tensor, ...],
                           margin: float = 1.0) -> Tensor:
    """L_sm from embeddings: the erased anchor's (N, D) against the tuple's other members.

    Args:
        mode: 'siamese', 'triplet' or 'quadruplet' (the table in the module docstring).
        masked_anchor: (N, D) embeddings f* of the erased anchors (x1 for 'siamese').
        members: the other members' embeddings, each (N, D): (f2,) for 'siamese', (fp, fn)
            for 'triplet', (fp, fn1, fn2) for 'quadruplet'.
        margin: m of the Siamese form.

    Returns:
        Scalar float32, the mean over the N tuples (0 with graph when N = 0).
    """
    V.choice("mode", mode, MODES)
    n = TUPLE_SIZES[mode] - 1
    if len(members) != n:
        raise ValueError(f"mode {mode!r} takes {n} member embeddings besides the masked anchor, got {len(members)}")
    masked_anchor = V.tensor("masked_anchor", masked_anchor, ndim=2)
    for i, m in enumerate(members):
        V.tensor(f"members[{i}]", m, ndim=2)
        if m.shape != masked_anchor.shape:
            raise ValueError(f"members[{i}] must have the masked anchor's shape {tuple(masked_anchor.shape)}, "
                             f"got {tuple(m.shape)}")
    if masked_anchor.shape[0] == 0:
        return masked_anchor.sum() * 0.0
    if mode == "siamese":
        per = (_dist(masked_anchor, members[0]) - float(margin)).abs()
    elif mode == "triplet":
        per = (_dist(masked_anchor, members[0]) - _dist(masked_anchor, members[1])).abs()
    else:
        fp, fn1, fn2 = members
        d_ap = _dist(masked_anchor, fp)
        per = (d_ap - _dist(masked_anchor, fn1)).abs() + (d_ap - _dist(fn1, fn2)).abs()
    return per.mean()


def _pairwise(emb: Tensor) -> Tensor:
    e = F.normalize(emb.float(), dim=1)
    return (2 - 2 * (e @ e.T)).clamp_min(0).sqrt()


def mine_tuples(mode: str, embeddings: Tensor, labels: Tensor,
                indices_tuple: tuple[Tensor, ...] | None = None) -> tuple[Tensor, ...]:
    """Index tuples into the batch, at most one per anchor, for L_sm.

    Args:
        mode: 'siamese' -> (x1, x2) positive pairs; 'triplet' -> (a, p, n);
            'quadruplet' -> (a, p, n1, n2), labels of a, n1, n2 all different.
        embeddings: (B, D) (used detached, for the batch-hard choice).
        labels: (B,) int labels.
        indices_tuple: optional miner output, pytorch-metric-learning style: triplets
            (a, p, n) or pairs (a1, p, a2, n). Default: batch hard (module docstring).

    Returns:
        ``TUPLE_SIZES[mode]`` int64 tensors (N,) on the embeddings' device.
    """
    V.choice("mode", mode, MODES)
    emb = V.tensor("embeddings", embeddings, ndim=2).detach()
    labels = V.tensor("labels", labels, ndim=1, device=emb.device)
    if labels.shape[0] != emb.shape[0]:
        raise ValueError(f"labels must hold one label per embedding ({emb.shape[0]}), got {labels.shape[0]}")
    b = emb.shape[0]
    dist = _pairwise(emb)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(b, dtype=torch.bool, device=emb.device)
    pos_ok, neg_ok = same & ~eye, ~same
    if indices_tuple is not None:
        from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

        if len(indices_tuple) == 4 and mode == "siamese":
            a, p = indices_tuple[0], indices_tuple[1]
            n = torch.full_like(a, -1)
        elif len(indices_tuple) in (3, 4):
            a, p, n = lmu.convert_to_triplets(tuple(indices_tuple), labels)
        else:
            raise ValueError(f"indices_tuple must be a miner's triplets (a, p, n) or pairs (a1, p, a2, n), "
                             f"got {len(indices_tuple)} tensors")
        a, p, n = (t.to(emb.device).long() for t in (a, p, n))
        if a.numel() == 0:
            e = torch.empty(0, dtype=torch.long, device=emb.device)
            return (e,) * TUPLE_SIZES[mode]
        # first tuple of each anchor: stable sort by anchor, keep the first of each run
        order = torch.sort(a, stable=True).indices
        a, p, n = a[order], p[order], n[order]
        first = torch.ones_like(a, dtype=torch.bool)
        first[1:] = a[1:] != a[:-1]
        a, p, n = a[first], p[first], n[first]
    else:
        has = pos_ok.any(1) & neg_ok.any(1) if mode != "siamese" else pos_ok.any(1)
        a = torch.nonzero(has).flatten()
        p = dist.masked_fill(~pos_ok, -1.0)[a].argmax(dim=1)
        n = dist.masked_fill(~neg_ok, float("inf"))[a].argmin(dim=1)
    if mode == "siamese":
        return a, p
    if mode == "triplet":
        return a, p, n
    # n2: nearest image to n1 whose class is neither a's nor n1's
    third = (labels[None, :] != labels[a][:, None]) & (labels[None, :] != labels[n][:, None])
    ok = third.any(dim=1)
    n2 = dist[n].masked_fill(~third, float("inf")).argmin(dim=1)
    return a[ok], p[ok], n[ok], n2[ok]


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module):
    """BatchNorm layers in training mode keep using batch statistics but do not update their running ones."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None
                          else None))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom, nbt in saved:
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


class SimilarityMiningLoss(nn.Module):
    """L = L_ml + gamma * L_sm: a metric loss plus similarity mining on the model's own attention.

    The equations, the defaults and every choice are in the module docstring
    (:mod:`whymatch.mining`).

    Args:
        mode: 'siamese', 'triplet' or 'quadruplet': the tuple form of the attention and of L_sm.
        alpha: sharpness of the soft mask T(A) = sigmoid(alpha (A - beta)).
        beta: threshold of the soft mask, on maps normalized to [0, 1].
        metric_loss: a pytorch-metric-learning loss (or any callable
            ``f(embeddings, labels, indices_tuple) -> scalar``); default
            ``ContrastiveLoss()`` for 'siamese', ``TripletMarginLoss(margin=0.1)`` otherwise.
            A loss with parameters (ProxyAnchorLoss's proxies) is registered as a submodule,
            so ``loss.parameters()`` holds them for the optimizer.
        gamma: weight of L_sm; 0 skips the mining computation (L_ml alone).
        target_layers: layer(s) of the embedder whose activations make the attention
            (names, modules, or None for the last feature map, as SimilarityAttention).
        miner: optional pytorch-metric-learning miner ``miner(embeddings, labels) -> indices_tuple``;
            its tuples go to the metric loss and to L_sm.
        margin: m of the Siamese L_sm.
        normalize: 'max' or 'minmax' normalization of each map before the threshold.
        detach_attention: treat the maps as constants (an ablation: no gradient through the
            attention, only through the erased image's embedding).
        learn_threshold: make alpha and beta learnable parameters of the loss (initialized to
            the given values; the Trainer optimizes the loss's parameters with ``loss_lr``).
            The soft-mask op gives their gradients.

    Call: ``loss(model, images, labels)`` with the SimilarityModel (or bare embedder), images
    (B, C, H, W) and labels (B,) int, returns a :class:`MiningLossOutput` (total, metric, mining,
    n_tuples). Backpropagate ``out.total``.
    """

    def __init__(self, mode: str = "triplet", alpha: float = 10.0, beta: float = 0.5,
                 metric_loss: object = None, gamma: float = 1.0, target_layers: object = None, *,
                 miner: object = None, margin: float = 1.0, normalize: str = "max",
                 detach_attention: bool = False, learn_threshold: bool = False) -> None:
        super().__init__()
        self.mode = V.choice("mode", mode, MODES)
        alpha, beta = V.real("alpha", alpha), V.real("beta", beta)
        if learn_threshold:
            self.alpha = nn.Parameter(torch.tensor(alpha))
            self.beta = nn.Parameter(torch.tensor(beta))
        else:
            self.alpha, self.beta = alpha, beta
        self.gamma = V.real("gamma", gamma)
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.margin = V.real("margin", margin)
        self.normalize = V.choice("normalize", normalize, NORMALIZATIONS)
        self.detach_attention = bool(detach_attention)
        if metric_loss is None:
            from pytorch_metric_learning import losses

            metric_loss = losses.ContrastiveLoss() if mode == "siamese" else losses.TripletMarginLoss(margin=0.1)
        if not callable(metric_loss):
            raise TypeError(f"metric_loss must be a pytorch-metric-learning loss or a callable "
                            f"(embeddings, labels, indices_tuple) -> scalar, got {type(metric_loss).__name__}")
        if miner is not None and not callable(miner):
            raise TypeError(f"miner must be a pytorch-metric-learning miner or a callable "
                            f"(embeddings, labels) -> indices_tuple, got {type(miner).__name__}")
        self.metric_loss = metric_loss  # an nn.Module is registered (its parameters are optimized)
        self.miner = miner
        self.target_layers = target_layers
        self._layers: list[tuple[str, nn.Module]] | None = None
        self._layers_of: int | None = None

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, alpha={float(self.alpha):g}, beta={float(self.beta):g}, gamma={self.gamma}, "
                f"normalize={self.normalize!r}")

    # ------------------------------------------------------------ pieces
    def _layers_for(self, sim: SimilarityModel, images: Tensor) -> list[tuple[str, nn.Module]]:
        if self._layers is None or self._layers_of != id(sim.embedder):
            layers = _cam.resolve_target_layers(sim, self.target_layers)
            if layers is None:  # find the last feature map without touching BatchNorm statistics
                modes = [(m, m.training) for m in sim.modules()]
                sim.eval()
                try:
                    layers = _cam.auto_layer(sim, images[:1])
                finally:
                    for m, t in modes:
                        m.training = t
            self._layers, self._layers_of = layers, id(sim.embedder)
        return self._layers

    def _normalize(self, cam: Tensor) -> Tensor:
        flat = cam.flatten(1)
        if self.normalize == "minmax":
            lo = flat.amin(dim=1)[:, None, None]
            cam = cam - lo
            flat = cam.flatten(1)
        return cam / flat.amax(dim=1).clamp_min(1e-12)[:, None, None]

    def attention(self, embeddings: Tensor, activations: list[Tensor], tuples: tuple[Tensor, ...]) -> Tensor:
        """Normalized attention maps (N, h, w) of the anchors of N tuples, differentiable.

        Args:
            embeddings: (B, D) embeddings of the batch, with graph to ``activations``.
            activations: the target layers' outputs (B, C, h, w) of the same forward pass.
            tuples: index tensors (N,) into the batch, anchor first (anchors distinct).

        Returns:
            (N, h, w) float32 in [0, 1] at the resolution of the first (finest) target layer;
            several layers: each normalized, upsampled bilinearly to the largest map, averaged.
        """
        f = F.normalize(embeddings.float(), dim=1)
        w = similarity_weights(self.mode, [f[t].detach() for t in tuples], True)
        anchors = tuples[0]
        score = (w * f[anchors]).sum()
        _cam.check_differentiable(score, activations, "SimilarityMiningLoss")
        grads = torch.autograd.grad(score, activations, create_graph=not self.detach_attention, retain_graph=True)
        maps = []
        for a, g in zip(activations, grads):
            a_n, g_n = a[anchors].float(), g[anchors].float()
            weights = g_n.mean(dim=(2, 3), keepdim=True)
            maps.append(self._normalize(F.relu((weights * a_n).sum(dim=1))))
        if len(maps) > 1:
            size = max((m.shape[1:] for m in maps), key=lambda s: s[0] * s[1])
            maps = [m if m.shape[1:] == size else
                    F.interpolate(m[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
                    for m in maps]
            out = torch.stack(maps).mean(dim=0)
        else:
            out = maps[0]
        return out.detach() if self.detach_attention else out

    # ------------------------------------------------------------ call
    def forward(self, model: SimilarityModel | nn.Module, images: Tensor, labels: Tensor,
                indices_tuple: tuple[Tensor, ...] | None = None) -> MiningLossOutput:
        """Total loss and its parts for one batch; see the class docstring."""
        sim = model if isinstance(model, SimilarityModel) else SimilarityModel(model, in_channels=None)
        images = V.tensor("images", images, ndim=4, dtypes=V.FLOAT_DTYPES, nonempty=True)
        labels = V.tensor("labels", labels, ndim=1, device=images.device)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must hold one label per image ({images.shape[0]}), got {labels.shape[0]}")
        if labels.is_floating_point():
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        mining = self.gamma > 0
        layers = self._layers_for(sim, images) if mining else []
        with _cam.ActivationCapture(layers) as cap:
            emb = sim(images)
        if indices_tuple is None and self.miner is not None:
            indices_tuple = self.miner(emb, labels)
        metric = self.metric_loss(emb, labels, indices_tuple)
        if not mining:
            return MiningLossOutput(metric, metric, metric.new_zeros(()), 0)
        acts = cap.single()
        tuples = mine_tuples(self.mode, emb, labels, indices_tuple)
        n = int(tuples[0].numel())
        if n == 0:
            zero = emb.sum() * 0.0
            return MiningLossOutput(metric + zero, metric, zero, 0)
        maps = self.attention(emb, acts, tuples)
        erased = soft_mask(images[tuples[0]], maps, self.alpha, self.beta)  # upsamples the (N, h, w) maps itself
        with _frozen_bn_stats(sim):
            f_star = sim(erased)
        sm = similarity_mining_loss(self.mode, f_star, [emb[t] for t in tuples[1:]], self.margin)
        return MiningLossOutput(metric + self.gamma * sm, metric, sm, n)
