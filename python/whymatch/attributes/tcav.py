"""TCAV over a similarity model's embedding: concept activation vectors and triplet-loss sensitivities.

SANE (Plummer et al., "Why do These Match?", ECCV 2020) uses TCAV (Kim et al., ICML 2018) as a prior
over attributes: how much does moving an image's embedding towards an attribute make it match its
positive better than its negative?  All quantities live in the embedding space of the model.

Concept activation vectors (CAVs).  For every attribute j one linear classifier on embeddings x (N, D)
separates images with the attribute (y_j = 1) from images without it.  All A classifiers are one
(D -> A) linear layer, trained at once, full batch, with L-BFGS (strong Wolfe line search,
``n_steps`` iterations at most):

    x' = (x - mean(x)) / s,   s = sqrt(mean over coordinates of the per-coordinate variance)
    z_ij = w_j . x'_i + b_j
    loss = sum_j [ sum_i c_ij * BCE(z_ij, y_ij) + l2 * ||w_j||^2 ]

with c_ij = 1 / (2 n_j^+) for the n_j^+ training positives and 1 / (2 n_j^-) for the n_j^- training
negatives when ``balance`` (a class-balanced mean), else 1 / n_j.  The isotropic rescaling by s does
not change any direction; it makes ``l2`` independent of the embedding's scale.  The CAV is the unit
normal pointing towards "has the attribute":

    v_j = w_j / ||w_j||            (A, D)

Sensitivity.  For a triplet (anchor a, positive p, negative n) of embeddings and the model's
similarity s, with d = -s:

    L(a) = max(0, d(a, p) - d(a, n) + margin),   margin = machine epsilon by default
    S_j  = grad_a(-L)(a) . v_j = 1[d(a, p) - d(a, n) + margin > 0] * grad_a[s(a, p) - s(a, n)] . v_j

S_j > 0: moving the anchor's embedding along the concept lowers the triplet loss, i.e. brings the
anchor closer to its positive than to its negative.  Where the hinge is inactive (the triplet is
already satisfied by more than the margin, d(a, p) - d(a, n) + margin <= 0) the gradient is 0, so
S_j = 0 exactly, which does NOT count as positive.  With margin = epsilon almost every correctly
ordered triplet is inactive; the TCAV score of a concept is then at most the fraction of violated
triplets.  ``hinge=False`` drops the max: S_j = grad_a[s(a, p) - s(a, n)] . v_j for every triplet.
All A sensitivities come from one autograd call: S = G @ V^T with G (P, D) the gradients.

TCAV score.  TCAV_j = (1 / P) * #{triplets with S_j > 0} over all P triplets (NaN for an attribute
without both positives and negatives, whose CAV is zero).

Significance (Kim et al., section 3.2).  ``n_random`` concept CAVs are re-fitted, each on all of the
attribute's positives against a random subset of its negatives of size m_j = min(n_j^+, n_j^-);
``n_random`` random CAVs are fitted on a random set of n_j^+ images against a disjoint random set of
m_j images (the same sizes).  A two-sided Welch t-test compares the concept's scores with the random
ones:

    t = (mean_c - mean_r) / sqrt(var_c / R + var_r / R),   df = Welch-Satterthwaite,
    p = I_{df / (df + t^2)}(df / 2, 1 / 2)      (regularized incomplete beta, computed here)

and the concept is significant when p < alpha.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import _validate as V
from ..similarity import SimilarityModel, pairwise_similarity

__all__ = ["TCAV", "TCAVSignificance", "PairSensitivity"]

_KINDS = ("cosine", "dot", "neg_l2")
_FLOATS = (*V.FLOAT_DTYPES, torch.float64)
_CHUNK = 256  # rows per call of a callable similarity (only its diagonal is used)


@dataclass
class TCAVSignificance:
    """Result of :meth:`TCAV.significance`; all tensors on the anchors' device.

    Attributes:
        scores: (A,) float32, mean TCAV score of the concept's ``n_random`` re-fitted CAVs.
        concept_scores: (n_random, A) float32, the TCAV score of each concept re-fit.
        random_scores: (n_random, A) float32, the TCAV scores of the random CAVs, whose random sets
            have the sizes of each attribute's sets.
        p_values: (A,) float32, two-sided Welch t-test of concept_scores against random_scores.
        significant: (A,) bool, p_values < alpha (False where the attribute is invalid).
    """

    scores: Tensor
    concept_scores: Tensor
    random_scores: Tensor
    p_values: Tensor
    significant: Tensor


def _check_device(device: object) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(f"device must be None, a torch.device or a device string, got {device!r}") from None


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return seed


def _resolve_similarity(similarity: object) -> str | Callable[[Tensor, Tensor], Tensor]:
    if isinstance(similarity, SimilarityModel):
        return similarity.pairwise
    if isinstance(similarity, str):
        if similarity not in _KINDS:
            raise ValueError(f"similarity must be 'cosine', 'dot', 'neg_l2', a callable f(a, b) -> (Na, Nb) "
                             f"or a SimilarityModel, got {similarity!r}")
        return similarity
    if callable(similarity):
        return similarity
    raise TypeError(f"similarity must be 'cosine', 'dot', 'neg_l2', a callable f(a, b) -> (Na, Nb) or a "
                    f"SimilarityModel, got {type(similarity).__name__}")


def _embeddings(name: str, t: object, *, device: torch.device | None = None) -> Tensor:
    t = V.tensor(name, t, ndim=2, dtypes=_FLOATS, device=device, nonempty=True)
    return V.finite(name, t)


def _binary(name: str, t: object, n: int) -> Tensor:
    t = V.tensor(name, t, ndim=2)
    if t.shape[0] != n:
        raise ValueError(f"{name} must have one row per embedding: expected shape ({n}, A), got {tuple(t.shape)}")
    if t.dtype == torch.bool:
        return t
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16,
                                                                   torch.int32, torch.int64)):
        raise ValueError(f"{name} must be bool or hold 0/1 values, got dtype {str(t.dtype).replace('torch.', '')}")
    if t.numel() and not bool(((t == 0) | (t == 1)).all()):
        bad = t[(t != 0) & (t != 1)].flatten()[0].item()
        raise ValueError(f"{name} must be bool or hold only 0/1 values, got the value {bad}")
    return t != 0


def _betainc(a: Tensor, b: Tensor, x: Tensor, max_iter: int = 500) -> Tensor:
    """Regularized incomplete beta I_x(a, b), elementwise, float64 (continued fraction, Lentz's method)."""
    swap = x > (a + 1) / (a + b + 2)
    a, b, x = torch.where(swap, b, a), torch.where(swap, a, b), torch.where(swap, 1 - x, x)
    log_front = a * torch.log(x) + b * torch.log1p(-x) - (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b))
    front = torch.exp(log_front) / a
    tiny = 1e-300
    f = torch.ones_like(x)
    c = torch.ones_like(x)
    dd = torch.zeros_like(x)
    for j in range(1, max_iter):
        m = j // 2
        if j % 2:
            coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        dd = 1 + coef * dd
        dd = 1 / torch.where(dd.abs() < tiny, torch.full_like(dd, tiny), dd)
        c = 1 + coef / c
        c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
        delta = c * dd
        f = f * delta
        if bool(((delta - 1).abs() < 1e-15).all()):
            break
    out = torch.where(x > 0, front / f, torch.zeros_like(x))
    return torch.where(swap, 1 - out, out)


def _welch_two_sided(x: Tensor, y: Tensor) -> Tensor:
    """Two-sided Welch t-test p-values of the columns of x (R1, A) against those of y (R2, A)."""
    x, y = x.double(), y.double()
    n1, n2 = x.shape[0], y.shape[0]
    v1, v2 = x.var(dim=0) / n1, y.var(dim=0) / n2
    se2 = v1 + v2
    diff = x.mean(dim=0) - y.mean(dim=0)
    t2 = diff.square() / se2
    df = se2.square() / (v1.square() / (n1 - 1) + v2.square() / (n2 - 1))
    ok = se2 > 0
    df = torch.where(ok, df, torch.ones_like(df))
    xx = torch.where(ok, df / (df + t2), torch.ones_like(df))
    p = _betainc(df / 2, torch.full_like(df, 0.5), xx).clamp(0, 1)
    # No spread in either sample: identical means are p = 1, different means p = 0.
    p = torch.where(ok, p, (diff == 0).double())
    nan = torch.isnan(x).any(dim=0) | torch.isnan(y).any(dim=0)
    return torch.where(nan, torch.full_like(p, float("nan")), p)


class TCAV:
    """Concept activation vectors over a similarity model's embeddings, and their TCAV scores.

    Args:
        similarity: the model's similarity over embeddings: 'cosine' (default), 'dot', 'neg_l2', a
            callable ``f(a, b) -> (Na, Nb)`` on embedding batches (it must be row-wise: entry (i, k)
            may depend on a[i] and b[k] only; only the diagonal of (256, 256) blocks is used), or a
            SimilarityModel, whose ``.pairwise`` is used.
        margin: triplet-loss margin; None (default): the machine epsilon of the dtype in which the
            similarity is computed (float32: 1.19e-7; float64: 2.2e-16).
        hinge: True (default): the loss is max(0, d(a,p) - d(a,n) + margin), so triplets where the
            hinge is inactive have sensitivity exactly 0 (not positive); False: the loss is
            d(a,p) - d(a,n), and every triplet contributes its gradient.
        l2: weight of the squared L2 norm of each classifier's weights (on embeddings centred and
            rescaled to unit mean per-coordinate variance).
        n_steps: L-BFGS iterations of the full-batch fit (strong Wolfe line search).
        balance: class-balanced logistic loss (positives and negatives weigh half each).
        device: where the classifiers are trained; None: the GPU when one is visible, else the
            embeddings' device.  Results are returned on the caller's device.
        seed: seed of the holdout split and of the significance test's random sets; global RNG state
            is untouched.
        attribute_names: optional names of the A attributes.

    After :meth:`fit`: ``cavs`` (A, D) float32 unit rows (zero for invalid attributes),
    ``accuracy`` (A,) float32 held-out balanced accuracy, ``valid`` (A,) bool, ``attribute_names``.
    """

    def __init__(self, *, similarity: str | Callable[[Tensor, Tensor], Tensor] | SimilarityModel = "cosine",
                 margin: float | None = None, hinge: bool = True, l2: float = 1e-3, n_steps: int = 200,
                 balance: bool = True, device: torch.device | str | None = None, seed: int = 0,
                 attribute_names: Sequence[str] | None = None) -> None:
        self._sim = _resolve_similarity(similarity)
        self.similarity = similarity
        self.margin = None if margin is None else V.real("margin", margin, low=0.0)
        if not isinstance(hinge, bool):
            raise TypeError(f"hinge must be a bool, got {type(hinge).__name__}")
        self.hinge = hinge
        self.l2 = V.real("l2", l2, low=0.0)
        self.n_steps = V.positive_int("n_steps", n_steps)
        if not isinstance(balance, bool):
            raise TypeError(f"balance must be a bool, got {type(balance).__name__}")
        self.balance = balance
        self.device = _check_device(device)
        self.seed = _check_seed(seed)
        self._given_names = self._check_names(attribute_names)
        self.attribute_names = self._given_names
        self.cavs: Tensor | None = None
        self.accuracy: Tensor | None = None
        self.valid: Tensor | None = None

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _check_names(names: object, count: int | None = None) -> list[str] | None:
        if names is None:
            return None
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(s, str) for s in names):
            raise TypeError(f"attribute_names must be a sequence of str, got {type(names).__name__}")
        if count is not None and len(names) != count:
            raise ValueError(f"attribute_names must name all {count} attributes, got {len(names)} names")
        return list(names)

    def _fit_device(self, x: Tensor) -> torch.device:
        if self.device is not None:
            return self.device
        return torch.device("cuda") if torch.cuda.is_available() else x.device

    def _require_fitted(self) -> Tensor:
        if self.cavs is None:
            raise RuntimeError("this TCAV is not fitted: call fit(embeddings, attributes) or load_state_dict() first")
        return self.cavs

    def _train(self, x: Tensor, y: Tensor, c: Tensor) -> Tensor:
        """Weights (K, D) of K logistic classifiers on x (N, D), labels y (N, K), loss weights c (N, K)."""
        k, d = y.shape[1], x.shape[1]
        w = torch.zeros(k, d, dtype=x.dtype, device=x.device, requires_grad=True)
        b = torch.zeros(k, dtype=x.dtype, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.n_steps, max_eval=2 * self.n_steps,
                                history_size=20, tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            z = torch.addmm(b, x, w.T)
            # BCE with logits, written out: softplus(z) - y z (stable, and much faster on CPU than
            # F.binary_cross_entropy_with_logits with reduction='none' in recent torch).
            loss = (c * (F.softplus(z) - y * z)).sum()
            loss = loss + self.l2 * w.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return w.detach()

    @staticmethod
    def _loss_weights(pos: Tensor, neg: Tensor, balance: bool) -> Tensor:
        """Per-element loss weights (N, K) from inclusion masks of positives and negatives."""
        npos = pos.sum(0, keepdim=True).clamp(min=1)
        nneg = neg.sum(0, keepdim=True).clamp(min=1)
        if balance:
            return pos / (2 * npos) + neg / (2 * nneg)
        return (pos + neg) / (npos + nneg)

    @staticmethod
    def _standardize(x: Tensor) -> Tensor:
        x = x - x.mean(dim=0, keepdim=True)
        s = x.square().mean().sqrt()
        return x / s if float(s) > 0 else x

    def _fit_cavs(self, x: Tensor, y: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        """Unit CAVs (K, D) and weights (K, D) from labels y (N, K) and training masks pos/neg (N, K)."""
        c = self._loss_weights(pos.to(x.dtype), neg.to(x.dtype), self.balance)
        w = self._train(x, y.to(x.dtype), c)
        norm = w.norm(dim=1, keepdim=True)
        cavs = torch.where(norm > 0, w / norm.clamp(min=torch.finfo(w.dtype).tiny), torch.zeros_like(w))
        return cavs, w

    # --------------------------------------------------------------------- fit
    def fit(self, embeddings: Tensor, attributes: Tensor, *, holdout: float = 0.2) -> TCAV:
        """Fit the A concept classifiers at once.

        Args:
            embeddings: (N, D) float embeddings of N images.
            attributes: (N, A) bool or 0/1 labels: does image i have attribute j.
            holdout: fraction of each attribute's positives and of its negatives held out (a split
                stratified per attribute, at least one of each class stays in training) for
                ``accuracy``; 0: accuracy is measured on the training data.

        Sets ``cavs`` (A, D) float32, ``accuracy`` (A,) float32 (NaN for invalid attributes and where
        the held-out part lacks a class), ``valid`` (A,) bool (the attribute has both positives and
        negatives), on the embeddings' device.  Returns self.
        """
        x0 = _embeddings("embeddings", embeddings)
        n = x0.shape[0]
        if n < 2:
            raise ValueError(f"embeddings must hold at least 2 images, got {n}")
        y0 = _binary("attributes", attributes, n)
        if y0.shape[1] == 0:
            raise ValueError(f"attributes must have at least one column, got shape {tuple(y0.shape)}")
        holdout = V.real("holdout", holdout, low=0.0, high=1.0, open_high=True)
        a = y0.shape[1]
        names = self._check_names(self._given_names, a)

        g = torch.Generator().manual_seed(self.seed)
        y_cpu = y0.cpu()
        npos = y_cpu.sum(0)
        nneg = n - npos
        valid = (npos > 0) & (nneg > 0)
        # Per-attribute stratified holdout: the k smallest random keys of each class are held out.
        keys = torch.rand(n, a, generator=g)
        order = keys.argsort(dim=0)
        ys = torch.gather(y_cpu, 0, order)
        kpos = torch.floor(holdout * npos + 0.5).clamp(max=(npos - 1).clamp(min=0))
        kneg = torch.floor(holdout * nneg + 0.5).clamp(max=(nneg - 1).clamp(min=0))
        hold_sorted = (ys & (ys.cumsum(0) <= kpos)) | (~ys & ((~ys).cumsum(0) <= kneg))
        hold = torch.zeros_like(y_cpu).scatter_(0, order, hold_sorted)

        dev = self._fit_device(x0)
        dt = torch.float64 if x0.dtype == torch.float64 else torch.float32
        x = self._standardize(x0.to(device=dev, dtype=dt))
        y = y_cpu.to(dev)
        hold, valid_d = hold.to(dev), valid.to(dev)
        train = ~hold & valid_d
        cavs, w = self._fit_cavs(x, y, y & train, ~y & train)
        cavs = torch.where(valid_d[:, None], cavs, torch.zeros_like(cavs))

        with torch.no_grad():
            pred = (x @ w.T) > 0
        evalm = hold if holdout > 0 else train
        tp = (pred & y & evalm).sum(0).to(dt)
        tn = (~pred & ~y & evalm).sum(0).to(dt)
        np_, nn_ = (y & evalm).sum(0).to(dt), (~y & evalm).sum(0).to(dt)
        acc = 0.5 * (tp / np_ + tn / nn_)  # NaN (0/0) where a class is missing
        acc = torch.where(valid_d & (np_ > 0) & (nn_ > 0), acc, torch.full_like(acc, float("nan")))

        out = x0.device
        self.cavs = cavs.to(device=out, dtype=torch.float32)
        self.accuracy = acc.to(device=out, dtype=torch.float32)
        self.valid = valid.to(out)
        self.attribute_names = names if names is not None else [f"attribute_{j}" for j in range(a)]
        return self

    # ------------------------------------------------------------ sensitivity
    def _rowwise(self, a: Tensor, b: Tensor) -> Tensor:
        """s(a_i, b_i) for every row i: (P,)."""
        sim = self._sim
        if sim == "cosine":
            return (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)
        if sim == "dot":
            return (a * b).sum(1)
        if sim == "neg_l2":
            return -torch.linalg.vector_norm(a - b, dim=1)
        parts = []
        for s in range(0, a.shape[0], _CHUNK):
            e = min(a.shape[0], s + _CHUNK)
            out = sim(a[s:e], b[s:e])  # type: ignore[operator]
            if not isinstance(out, Tensor) or out.shape != (e - s, e - s):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"similarity must return shape ({e - s}, {e - s}) for inputs of {e - s} rows, "
                                 f"got {got}")
            parts.append(out.diagonal())
        return torch.cat(parts)

    def _triplet_inputs(self, anchors: object, positives: object, negatives: object,
                        dim: int | None) -> tuple[Tensor, Tensor, Tensor]:
        a = _embeddings("anchors", anchors)
        p = _embeddings("positives", positives, device=a.device)
        n = _embeddings("negatives", negatives, device=a.device)
        if dim is not None and a.shape[1] != dim:
            raise ValueError(f"anchors must have D = {dim} columns (the embedding dimension), got shape {tuple(a.shape)}")
        for name, t in (("positives", p), ("negatives", n)):
            if t.shape != a.shape:
                raise ValueError(f"{name} must have the anchors' shape {tuple(a.shape)}, got {tuple(t.shape)}")
        dt = torch.float64 if torch.float64 in (a.dtype, p.dtype, n.dtype) else torch.float32
        return a.to(dt), p.to(dt), n.to(dt)

    def _gradients(self, a: Tensor, p: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        """G (P, D) = grad_a [s(a, p) - s(a, n)] (one autograd call) and the hinge mask (P,) bool."""
        a = a.detach().requires_grad_(True)
        with torch.enable_grad():
            diff = self._rowwise(a, p.detach()) - self._rowwise(a, n.detach())  # = d(a,n) - d(a,p)
            if not diff.requires_grad:
                grad = torch.zeros_like(a)
            else:
                (grad,) = torch.autograd.grad(diff.sum(), a, allow_unused=True)
                grad = torch.zeros_like(a) if grad is None else grad
        diff = diff.detach()
        if self.hinge:
            margin = torch.finfo(diff.dtype).eps if self.margin is None else self.margin
            active = (margin - diff) > 0  # d(a,p) - d(a,n) + margin > 0
        else:
            active = torch.ones_like(diff, dtype=torch.bool)
        return grad.to(a.dtype), active

    def sensitivities(self, anchors: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        """Directional derivatives of minus the triplet loss along every CAV.

        Args:
            anchors, positives, negatives: (P, D) float embeddings of P triplets, on one device.

        Returns:
            (P, A) tensor, float64 when an input is float64 else float32, on the anchors' device:
            S[i, j] = grad_a(-L)(a_i) . v_j.  Positive: moving the anchor along concept j lowers the
            loss (the anchor gets closer to its positive than to its negative).  With ``hinge=True``
            rows whose hinge is inactive are exactly 0.
        """
        cavs = self._require_fitted()
        a, p, n = self._triplet_inputs(anchors, positives, negatives, cavs.shape[1])
        grad, active = self._gradients(a, p, n)
        sens = grad @ cavs.to(device=a.device, dtype=a.dtype).T
        return sens * active[:, None].to(sens.dtype)

    def scores(self, anchors: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        """TCAV scores (A,) float32: the fraction of the P triplets with positive sensitivity (NaN: invalid)."""
        sens = self.sensitivities(anchors, positives, negatives)
        out = (sens > 0).float().mean(dim=0)
        valid = self.valid.to(out.device)  # type: ignore[union-attr]
        return torch.where(valid, out, torch.full_like(out, float("nan")))

    # ------------------------------------------------------------ significance
    def significance(self, embeddings: Tensor, attributes: Tensor, anchors: Tensor, positives: Tensor,
                     negatives: Tensor, *, n_random: int = 10, alpha: float = 0.05) -> TCAVSignificance:
        """Test every concept's TCAV score against random CAVs (Kim et al., section 3.2).

        Fits ``n_random`` concept CAVs per attribute (all positives against a random subset of the
        negatives of size min(#pos, #neg)) and ``n_random`` random CAVs (a random image set of the
        concept's size against a disjoint random set of the negatives' subset size), all at once and
        without holdout, with this instance's settings; scores all of them on the given triplets and
        runs a two-sided Welch t-test per attribute.  Does not change the fitted ``cavs``.

        Args:
            embeddings: (N, D) float embeddings; attributes: (N, A) bool or 0/1.
            anchors, positives, negatives: (P, D) triplet embeddings, as in :meth:`sensitivities`.
            n_random: number of concept re-fits and of random CAVs (>= 2).
            alpha: significance level in (0, 1).

        Returns:
            TCAVSignificance on the anchors' device (NaN scores and p-values for invalid attributes).
        """
        x0 = _embeddings("embeddings", embeddings)
        n = x0.shape[0]
        if n < 2:
            raise ValueError(f"embeddings must hold at least 2 images, got {n}")
        y_cpu = _binary("attributes", attributes, n).cpu()
        r = V.positive_int("n_random", n_random, minimum=2)
        alpha = V.real("alpha", alpha, low=0.0, high=1.0, open_low=True, open_high=True)
        a, p, ng = self._triplet_inputs(anchors, positives, negatives, x0.shape[1])
        na = y_cpu.shape[1]

        g = torch.Generator().manual_seed(self.seed)
        npos = y_cpu.sum(0)
        nneg = n - npos
        valid = (npos > 0) & (nneg > 0)
        m = torch.minimum(npos, nneg)
        inf = torch.tensor(float("inf"))
        yr = y_cpu[:, None, :].expand(n, r, na)
        # Concept runs: all positives, and the m_j negatives with the smallest random keys.
        keys = torch.where(yr, inf, torch.rand(n, r, na, generator=g))
        rank = keys.argsort(dim=0).argsort(dim=0)
        c_pos = yr & valid
        c_neg = ~yr & (rank < m) & valid
        # Random runs: a random set of n_j^+ images against a disjoint random set of m_j images.
        rank = torch.rand(n, r, na, generator=g).argsort(dim=0).argsort(dim=0)
        r_pos = (rank < npos) & valid
        r_neg = (rank >= npos) & (rank < npos + m) & valid
        pos = torch.cat([c_pos, r_pos], dim=1).reshape(n, 2 * r * na)
        neg = torch.cat([c_neg, r_neg], dim=1).reshape(n, 2 * r * na)

        dev = self._fit_device(x0)
        dt = torch.float64 if x0.dtype == torch.float64 else torch.float32
        x = self._standardize(x0.to(device=dev, dtype=dt))
        per = max(1, (1 << 24) // max(1, n * na))  # runs per fit: at most ~16M loss elements
        cav_parts = []
        for s in range(0, 2 * r, per):
            cols = slice(s * na, min(2 * r, s + per) * na)
            pc, nc = pos[:, cols].to(dev), neg[:, cols].to(dev)
            cav_parts.append(self._fit_cavs(x, pc, pc, nc)[0].to(device=a.device, dtype=a.dtype))
        cavs = torch.cat(cav_parts)

        grad, active = self._gradients(a, p, ng)
        sens = (grad @ cavs.T) * active[:, None].to(a.dtype)
        sc = (sens > 0).float().mean(dim=0).reshape(2, r, na)
        valid_d = valid.to(a.device)
        sc = torch.where(valid_d, sc, torch.full_like(sc, float("nan")))
        pv = _welch_two_sided(sc[0], sc[1]).float()
        return TCAVSignificance(scores=sc[0].mean(dim=0), concept_scores=sc[0], random_scores=sc[1],
                                p_values=pv, significant=(pv < alpha) & valid_d)

    # ---------------------------------------------------------------- triplets
    @staticmethod
    def triplets(embeddings: Tensor, labels: Tensor | None = None, *, n: int | None = None, seed: int = 0,
                 similarity: str | Callable[[Tensor, Tensor], Tensor] | SimilarityModel = "neg_l2",
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """Index triplets (anchor, positive, negative) over a set of embeddings.

        Positive: the anchor's nearest neighbour (highest ``similarity``, default 'neg_l2', i.e.
        Euclidean) among the items with its label, itself excluded; without labels, among all other
        items.  Negative: a uniformly random item with another label; without labels, a random item
        other than the anchor and the positive.

        Args:
            embeddings: (N, D) float embeddings.
            labels: optional (N,) integer labels.
            n: number of triplets; None: one per eligible anchor (an item with a same-label partner
                and some other-label item), in index order.  Otherwise anchors are drawn from the
                eligible ones in random order, cycling when n exceeds their number.
            seed: seed of the random anchors and negatives (global RNG state is untouched).
            similarity: as in :class:`TCAV`, used to find the nearest neighbour.

        Returns:
            (anchor, positive, negative) int64 index tensors of length n, on the embeddings' device.
        """
        x = _embeddings("embeddings", embeddings)
        sim = _resolve_similarity(similarity)
        seed = _check_seed(seed)
        num = x.shape[0]
        if labels is not None:
            lab = V.tensor("labels", labels, ndim=1)
            if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
                raise ValueError(f"labels must be an integer tensor, got dtype {str(lab.dtype).replace('torch.', '')}")
            if lab.shape[0] != num:
                raise ValueError(f"labels must have one entry per embedding ({num}), got {lab.shape[0]}")
            _, inv, counts = torch.unique(lab.cpu(), return_inverse=True, return_counts=True)
            eligible = (counts[inv] >= 2) & (counts[inv] < num)
        else:
            inv = counts = None
            eligible = torch.full((num,), num >= 3)
        idx = eligible.nonzero().flatten()
        if idx.numel() == 0:
            need = "a label with at least 2 items and at least 2 labels" if labels is not None else "at least 3 items"
            raise ValueError(f"embeddings and labels give no valid triplet: need {need}")
        if n is not None:
            V.positive_int("n", n)
        g = torch.Generator().manual_seed(seed)
        if n is None:
            anchors = idx
        else:
            reps = -(-n // idx.numel())
            anchors = torch.cat([idx[torch.randperm(idx.numel(), generator=g)] for _ in range(reps)])[:n]

        # Positives: nearest neighbour per distinct anchor, in blocks of rows.
        uniq, back = torch.unique(anchors, return_inverse=True)
        inv_d = None if inv is None else inv.to(x.device)
        pos_u = torch.empty_like(uniq)
        with torch.no_grad():
            for s in range(0, uniq.numel(), 1024):
                rows = uniq[s:s + 1024]
                rd = rows.to(x.device)
                if isinstance(sim, str):
                    sm = pairwise_similarity(x[rd], x, sim)
                else:
                    sm = sim(x[rd].float(), x.float())
                sm = sm.float().clone()
                sm[torch.arange(rows.numel(), device=x.device), rd] = -float("inf")
                if inv_d is not None:
                    sm = sm.masked_fill(inv_d[rd][:, None] != inv_d[None, :], -float("inf"))
                pos_u[s:s + rows.numel()] = sm.argmax(dim=1).cpu()
        positives = pos_u[back]

        u = torch.rand(anchors.numel(), generator=g, dtype=torch.float64)
        if inv is None:
            k = torch.clamp((u * (num - 2)).long(), max=num - 3)
            lo, hi = torch.minimum(anchors, positives), torch.maximum(anchors, positives)
            k = k + (k >= lo).long()
            negatives = k + (k >= hi).long()
        else:
            order = torch.argsort(inv, stable=True)
            start = torch.cumsum(counts, 0) - counts
            la = inv[anchors]
            other = num - counts[la]
            k = torch.minimum((u * other).long(), other - 1)
            negatives = order[torch.where(k < start[la], k, k + counts[la])]
        dev = x.device
        return anchors.to(dev), positives.to(dev), negatives.to(dev)

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Fitted state as plain tensors (CPU), names and settings: loadable with torch.load(weights_only=True).

        ``config`` records the constructor settings (``similarity`` is None when it was a callable or a
        SimilarityModel); :meth:`load_state_dict` restores the fitted state only, :meth:`from_state_dict`
        rebuilds an instance from the config too.
        """
        cavs = self._require_fitted()
        sim = self.similarity if isinstance(self.similarity, str) else None
        return {
            "cavs": cavs.detach().cpu().clone(),
            "accuracy": self.accuracy.detach().cpu().clone(),  # type: ignore[union-attr]
            "valid": self.valid.detach().cpu().clone(),  # type: ignore[union-attr]
            "attribute_names": list(self.attribute_names or []),
            "config": {"similarity": sim, "margin": self.margin, "hinge": self.hinge, "l2": self.l2,
                       "n_steps": self.n_steps, "balance": self.balance, "seed": self.seed},
        }

    def load_state_dict(self, state: dict) -> TCAV:
        """Restore ``cavs``, ``accuracy``, ``valid`` and ``attribute_names`` from :meth:`state_dict`. Returns self."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from TCAV.state_dict(), got {type(state).__name__}")
        missing = [k for k in ("cavs", "accuracy", "valid", "attribute_names") if k not in state]
        if missing:
            raise ValueError(f"state must hold cavs, accuracy, valid and attribute_names, missing {missing}")
        cavs = V.finite("state['cavs']", V.tensor("state['cavs']", state["cavs"], ndim=2, dtypes=_FLOATS))
        na = cavs.shape[0]
        acc = V.tensor("state['accuracy']", state["accuracy"], ndim=1, dtypes=_FLOATS)
        valid = V.tensor("state['valid']", state["valid"], ndim=1, dtypes=(torch.bool,))
        if acc.shape[0] != na or valid.shape[0] != na:
            raise ValueError(f"state['accuracy'] and state['valid'] must have {na} entries like state['cavs'], "
                             f"got {acc.shape[0]} and {valid.shape[0]}")
        names = self._check_names(state["attribute_names"], na)
        self.cavs = cavs.detach().float().clone()
        self.accuracy = acc.detach().float().clone()
        self.valid = valid.detach().clone()
        self.attribute_names = names
        return self

    @classmethod
    def from_state_dict(cls, state: dict, *, similarity: object = None, device: object = None) -> TCAV:
        """A TCAV built from ``state['config']`` and loaded.

        ``similarity`` is required when the saved one was a callable or a SimilarityModel.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from TCAV.state_dict(), got {type(state).__name__}")
        cfg = dict(state.get("config") or {})
        sim = similarity if similarity is not None else cfg.pop("similarity", None)
        cfg.pop("similarity", None)
        if sim is None:
            raise ValueError("similarity must be given: the saved TCAV used a callable similarity, which is not saved")
        return cls(similarity=sim, device=device, **cfg).load_state_dict(state)  # type: ignore[arg-type]


# ====================================================================== per-pair sensitivity
_SENS_MODES = ("finite", "gradient")


class PairSensitivity:
    """Per-pair concept sensitivity: how much THIS pair's similarity relies on each attribute.

    TCAV's idea (a derivative of the model's output along a concept direction) taken to one pair
    (query q, reference r) of embeddings f(q), f(r) instead of a population of triplets. Each
    attribute j has a *removal direction* d_j (D,) in embedding space: where the query's embedding
    goes when the query loses attribute j. The sensitivity of pair (q, r) to j is the drop in
    similarity along it:

        finite   (default):  S_j(q, r) = s(f(q), f(r)) - s(f(q) + d_j, f(r))
        gradient:            S_j(q, r) = -grad_{f(q)} s(f(q), f(r)) . d_j

    (the gradient form is the first-order limit of the finite one; both in similarity units,
    positive when losing j hurts the match). An attribute the query does not have has no meaningful
    removal direction: :class:`~whymatch.attributes.explain.SANE` gates S_j by the attribute model's
    confidence that the query (and, for a shared attribute, the reference) has j.

    Where the directions come from (the data they need):
        - :meth:`from_cavs` (any data set with attribute labels): d_j = -step * v_j, the TCAV concept
          activation vector v_j (unit normal of a linear probe, :class:`TCAV`) scaled by ``step``
          (similarity-model units; a global direction, the same for every query). This is what a
          data set WITHOUT counterfactuals (AwA2, Polyvore Outfits) gets; fit the CAVs on
          key-object or per-object labels where the data set has them.
        - :meth:`from_counterfactuals` (a data set that can re-render an image with one attribute
          changed, e.g. ``ShapesWorld.counterfactual``; its own supervision, like per-object labels):
          the measured embedding changes f(x') - f(x) of N training images x, each with attribute
          j changed to its alternative values (mean over the alternatives). With ``k=None`` d_j is
          the mean over all training images (a "counterfactual CAV", with its magnitude); with an
          int ``k`` it is *local*: the mean over the k training images nearest to the query (cosine
          of embeddings) among those whose change of j was measured, so d_j depends on the query.

    Args:
        similarity: as in :class:`TCAV`: 'cosine', 'dot', 'neg_l2', a row-wise callable, or a
            SimilarityModel (its ``.pairwise``).
        mode: 'finite' or 'gradient'.
    """

    def __init__(self, *, similarity: str | Callable[[Tensor, Tensor], Tensor] | SimilarityModel = "cosine",
                 mode: str = "finite") -> None:
        self._tcav = TCAV(similarity=similarity)       # row-wise similarity of embeddings
        self.mode = V.choice("mode", mode, _SENS_MODES)
        self.directions: Tensor | None = None          # (A, D) global directions
        self.bank: Tensor | None = None                # (N, A, D) per-training-image changes (NaN: not measured)
        self.bank_keys: Tensor | None = None           # (N, D) unit embeddings of the training images
        self.k: int | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_cavs(cls, cavs: Tensor, *, step: float = 1.0, similarity: object = "cosine",
                  mode: str = "finite") -> PairSensitivity:
        """Directions d_j = -step * v_j from TCAV's (A, D) unit CAVs (``TCAV(...).fit(...).cavs``).

        A zero CAV (an attribute TCAV could not fit) gives a zero direction, so S_j = 0.
        """
        c = V.finite("cavs", V.tensor("cavs", cavs, ndim=2, dtypes=_FLOATS, nonempty=True))
        step = V.real("step", step, low=0.0, open_low=True)
        out = cls(similarity=similarity, mode=mode)  # type: ignore[arg-type]
        out.directions = (-step * c.detach()).clone()
        return out

    @classmethod
    def from_counterfactuals(cls, embeddings: Tensor, changed: Tensor, source: Tensor, attribute: Tensor,
                             n_attributes: int, *, k: int | None = None, similarity: object = "cosine",
                             mode: str = "finite") -> PairSensitivity:
        """Directions from measured counterfactual embedding changes.

        Args:
            embeddings: (N, D) embeddings f(x) of N training images.
            changed: (M, D) embeddings f(x') of M counterfactual renders.
            source: (M,) int64, the training image each render was made from (index into embeddings).
            attribute: (M,) int64, the attribute (in [0, n_attributes)) that the render removed.
            n_attributes: A.
            k: None: one global direction per attribute (mean over all its changes); an int: local
                directions, the mean over the k nearest training images (see the class docstring).

        Returns:
            A PairSensitivity.
        """
        x = _embeddings("embeddings", embeddings)
        c = _embeddings("changed", changed, device=x.device)
        if c.shape[1] != x.shape[1]:
            raise ValueError(f"changed must have D = {x.shape[1]} columns like embeddings, got {c.shape[1]}")
        n, m = x.shape[0], c.shape[0]
        a = V.positive_int("n_attributes", n_attributes)
        idx = []
        for name, t, hi in (("source", source, n), ("attribute", attribute, a)):
            t = V.tensor(name, torch.as_tensor(t), ndim=1)
            if t.is_floating_point() or t.dtype == torch.bool:
                raise TypeError(f"{name} must hold integer indices, got {t.dtype}")
            if t.shape[0] != m:
                raise ValueError(f"{name} must have one entry per row of changed ({m}), got {t.shape[0]}")
            if m and (int(t.min()) < 0 or int(t.max()) >= hi):
                raise ValueError(f"{name} must hold indices in [0, {hi}), got [{int(t.min())}, {int(t.max())}]")
            idx.append(t.long().to(x.device))
        src, att = idx
        if k is not None:
            k = V.positive_int("k", k)
        d = x.shape[1]
        delta = c.to(x.dtype) - x[src]
        flat = src * a + att                                      # one cell per (image, attribute)
        ones = torch.ones(m, device=x.device, dtype=x.dtype)
        sums = torch.zeros(n * a, d, device=x.device, dtype=x.dtype).index_add_(0, flat, delta)
        cnt = torch.zeros(n * a, device=x.device, dtype=x.dtype).index_add_(0, flat, ones)
        bank = (sums / cnt.clamp_min(1)[:, None]).reshape(n, a, d)
        bank = torch.where((cnt > 0).reshape(n, a, 1), bank, torch.full_like(bank, float("nan")))
        out = cls(similarity=similarity, mode=mode)  # type: ignore[arg-type]
        have = ~torch.isnan(bank[..., 0])                          # (N, A)
        glob = torch.nan_to_num(bank).sum(0) / have.sum(0).clamp_min(1)[:, None]
        out.directions = glob
        if k is not None:
            out.bank, out.bank_keys, out.k = bank, F.normalize(x, dim=1), k
        return out

    # ------------------------------------------------------------------ use
    def _require(self) -> Tensor:
        if self.directions is None:
            raise RuntimeError("this PairSensitivity has no directions: build it with from_cavs() or "
                               "from_counterfactuals()")
        return self.directions

    def directions_for(self, queries: Tensor) -> Tensor:
        """(P, A, D) removal directions for P query embeddings (the global ones repeated when k is None)."""
        glob = self._require()
        q = _embeddings("queries", queries)
        if q.shape[1] != glob.shape[1]:
            raise ValueError(f"queries must have D = {glob.shape[1]} columns, got {q.shape[1]}")
        glob = glob.to(q.device)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        glob = glob.to(dt)
        if self.bank is None:
            return glob[None].expand(q.shape[0], -1, -1)
        bank = self.bank.to(device=q.device, dtype=dt)
        keys = self.bank_keys.to(device=q.device, dtype=dt)  # type: ignore[union-attr]
        sims = F.normalize(q.to(dt), dim=1) @ keys.T                        # (P, N)
        have = ~torch.isnan(bank[..., 0])                                    # (N, A)
        out = glob[None].repeat(q.shape[0], 1, 1)
        for j in range(bank.shape[1]):
            rows = have[:, j].nonzero().flatten()
            if rows.numel() == 0:
                continue
            kk = min(self.k, rows.numel())  # type: ignore[type-var]
            nn_idx = rows[sims[:, rows].topk(kk, dim=1).indices]            # (P, kk)
            out[:, j] = bank[nn_idx, j].mean(1)
        return out

    def sensitivities(self, queries: Tensor, references: Tensor) -> Tensor:
        """S (P, A) for P pairs of embeddings (queries[i], references[i]); see the class docstring.

        Float64 when the queries are float64, else float32, on the queries' device.
        """
        q = _embeddings("queries", queries)
        r = _embeddings("references", references, device=q.device)
        if r.shape != q.shape:
            raise ValueError(f"references must have the queries' shape {tuple(q.shape)}, got {tuple(r.shape)}")
        d = self.directions_for(q)                                           # (P, A, D)
        p, a = d.shape[:2]
        if p == 0:
            return torch.zeros(0, a, device=q.device, dtype=d.dtype)
        dt = d.dtype
        q, r = q.to(dt), r.to(dt)
        rowwise = self._tcav._rowwise
        if self.mode == "gradient":
            qq = q.detach().requires_grad_(True)
            with torch.enable_grad():
                s = rowwise(qq, r.detach())
                (g,) = torch.autograd.grad(s.sum(), qq, allow_unused=True)
            g = torch.zeros_like(q) if g is None else g
            return -(d @ g[:, :, None])[..., 0]
        with torch.no_grad():
            base = rowwise(q, r)                                             # (P,)
            moved = (q[:, None, :] + d).reshape(p * a, -1)
            s = rowwise(moved, r[:, None, :].expand(p, a, -1).reshape(p * a, -1)).reshape(p, a)
        return base[:, None] - s
