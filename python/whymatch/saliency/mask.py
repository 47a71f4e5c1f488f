"""Learned deletion masks for similarity (Fong & Vedaldi 2017, "meaningful perturbation", as SANE used it)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import _validate as V
from ..similarity import SimilarityModel
from . import _common
from .base import Explainer

__all__ = ["Mask", "PRESETS", "median_blur", "gaussian_blur"]

PERTURBATIONS = ("median", "blur", "noise", "constant")

#: Named settings of :class:`Mask`; an argument given explicitly overrides its preset's value.
PRESETS = {
    # SANE's published configuration (Plummer et al. 2020, their code's defaults).
    "sane": dict(mask_size=14, n_iter=500, lr=0.1, l1_coeff=0.01, tv_coeff=0.2, tv_beta=3.0,
                 perturbation="median", blur_size=11, noise_std=0.05),
    # SANE's L1 weight of 0.01 lets the mask delete almost the whole image (deleting everything costs at
    # most 0.01 while it lowers a cosine similarity by ~0.5), so the map is high everywhere. 'real': the L1
    # weight chosen on the validation split of benchmarks/realphoto_table.py --sweep (see Mask's docstring).
    "real": dict(mask_size=14, n_iter=100, lr=0.1, l1_coeff=1.0, tv_coeff=0.2, tv_beta=3.0,
                 perturbation="blur", blur_size=11, noise_std=0.05),
}


def _reflect_pad(x: Tensor, r: int) -> Tensor:
    """Reflect-pad (B, C, H, W) by r, falling back to replicate where the image is too small to reflect."""
    if r == 0:
        return x
    mode = "reflect" if min(x.shape[2:]) > r else "replicate"
    return F.pad(x, (r, r, r, r), mode=mode)


def median_blur(images: Tensor, size: int) -> Tensor:
    """Per-channel median over size x size windows with reflect padding, (B, C, H, W) -> same shape.

    For an even count of values torch's median is the lower of the two middle ones.
    Rows are processed in chunks so the unfolded windows stay under ~64 MB.
    """
    b, c, h, w = images.shape
    r = size // 2
    padded = _reflect_pad(images.float(), r)
    out = torch.empty(b, c, h, w, dtype=torch.float32, device=images.device)
    rows = max(1, (64 << 20) // max(1, 4 * b * c * w * size * size))
    for y in range(0, h, rows):
        y1 = min(h, y + rows)
        band = padded[:, :, y:y1 + 2 * r]  # (B, C, rows + 2r, W + 2r)
        win = band.unfold(2, size, 1).unfold(3, size, 1)  # (B, C, rows, W, size, size)
        out[:, :, y:y1] = win.reshape(b, c, y1 - y, w, size * size).median(dim=-1).values
    return out


def gaussian_blur(images: Tensor, size: int, sigma: float) -> Tensor:
    """Separable Gaussian blur (kernel ``size``, ``sigma``) with reflect padding, (B, C, H, W)."""
    r = size // 2
    t = torch.arange(size, dtype=torch.float32, device=images.device) - r
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = images.shape[1]
    x = _reflect_pad(images.float(), r)
    x = F.conv2d(x, k.view(1, 1, 1, size).expand(c, 1, 1, size).contiguous(), groups=c)
    return F.conv2d(x, k.view(1, 1, size, 1).expand(c, 1, size, 1).contiguous(), groups=c)


def _tv(m: Tensor, beta: float) -> Tensor:
    """Per-mask total variation mean(|dm/dy|^beta) + mean(|dm/dx|^beta), m (B, 1, h, w) -> (B,)."""
    zero = m.new_zeros(m.shape[0])
    dy = (m[:, :, 1:] - m[:, :, :-1]).abs().pow(beta).flatten(1).mean(1) if m.shape[2] > 1 else zero
    dx = (m[:, :, :, 1:] - m[:, :, :, :-1]).abs().pow(beta).flatten(1).mean(1) if m.shape[3] > 1 else zero
    return dy + dx


class Mask(Explainer):
    """The smallest, smoothest deletion that destroys the match, learned by gradient descent.

    For each pair (query q, reference r) a low-resolution mask m in [0, 1]
    (``mask_size`` x ``mask_size``, 1 = keep) is upsampled bilinearly to the query's
    size and blends the query with a perturbed version of itself:

        q~ = up(m) * q + (1 - up(m)) * P(q) + eps,   eps ~ N(0, noise_std^2) per step

    and minimized with Adam:

        L(m) = sim(f(q~), f(r)) + l1_coeff * mean|1 - m| + tv_coeff * TV_beta(m)

    TV_beta(m) = mean |dm/dy|^beta + mean |dm/dx|^beta on the low-resolution mask
    (the variable being optimized, as Fong & Vedaldi's objective). After each
    step m is clamped to [0, 1]. The saliency is ``1 - up(m)``: high where deleting
    the pixels lowers the similarity. Minimizing the similarity itself (the
    SimilarityModel's, cosine for the shipped model) is SANE's objective.

    Settings come from a named ``preset``; any argument given explicitly overrides it.
    ``preset='real'`` (default) is meant for real photos and pretrained embeddings:
    SANE's L1 weight of 0.01 lets the mask delete almost the whole image (deleting
    everything costs at most 0.01 and lowers a cosine similarity by about 0.5), so its
    map is high almost everywhere. 'real' (``PRESETS['real']``) weighs the deleted area
    100 times more (L1 weight 1.0), blurs (Gaussian, 11 px, sigma 10) instead of a median
    filter and takes 100 steps. The L1 weight was chosen on the validation split of
    ``benchmarks/realphoto_table.py --sweep`` (EfficientNet-lite0, cosine, 8 pairs at
    112 px, 100 steps, blur; ``results/realphoto_sweep_112.md``): pointing game 0.25 at
    0.05, 0.38 at 0.2, 0.50 at 0.5 and 0.50 at 1.0, where 1.0 put more of the map on
    the shared object (mass 0.40 against 0.36) and had the higher insertion AUC (at 224 px
    on 4 validation pairs and 40 steps, ``results/realphoto_sweep_224check.md``, 0.5 and 1.0
    tie at pointing 0.25 and 0.2 points at none: too few pairs to separate them); the
    other settings (lr 0.1, TV 0.2 with beta 3, 14 x 14 mask, noise 0.05) are SANE's and
    were not swept (no time on the shared machine), nor were 300 against 100 steps.
    Expect a pointing game near 0.5 on real photos (chance ~0.1): it is the weakest of
    the black-box methods there, and on a small untrained model whose similarity hardly
    drops it may keep every pixel (a constant map, with its warning).

    ``preset='sane'`` is SANE's published configuration: Adam lr 0.1, 500 iterations,
    L1 weight 0.01, TV weight 0.2 with beta 3, a median blur of 11 pixels as the
    perturbation, and input noise of std 0.2 *in ImageNet-normalized space*, which
    is 0.05 in the [0, 1] pixel space whymatch explainers work in (0.2 x the
    ImageNet std of about 0.226); pass ``noise_std=0.2`` for a model that takes
    normalized inputs directly. The 14 x 14 mask follows SANE's 112 px images
    (Fong & Vedaldi used 28 x 28 at 224 px).

    Perturbations P (computed once per image, not per step):
        'median': per-channel median filter ``blur_size`` (SANE);
        'blur': Gaussian blur ``blur_size`` / ``blur_sigma`` (Fong & Vedaldi's default);
        'noise': q + N(0, 1) noise drawn once per pair (Fong & Vedaldi's noise operator
            with unit std in image space);
        'constant': the ``baseline`` (number, 'mean' or tensor).

    Batching: many pairs are optimized together, one mask per pair and ONE forward
    and backward pass of the model per step for the whole batch (2 x batch images
    in both-images mode). Per-pair losses are summed, so each mask receives its
    own pair's gradient and Adam's per-element update makes batched optimization
    equal to optimizing each pair alone. The noise of pair i of a call comes from
    its own generator seeded with (seed, i), so a pair's result does not depend on
    the batch size either.

    ``fixed_reference=False`` is SANE's both-images mode: a query mask and a
    reference mask are learned jointly for each pair, minimizing
    sim(f(q~), f(r~)) plus the regularizers of both masks.

    Only the masks receive gradients (``torch.autograd.grad``): the model's
    parameters never accumulate ``.grad``. The model should be in eval mode
    (BatchNorm in training mode would mix the pairs of a batch); a warning says so.

    Cost: ``n_iter`` forward + backward passes over each batch of pairs.

    Args:
        sim: the SimilarityModel to explain (its similarity must be differentiable).
        preset: 'real' (default) or 'sane': the values of the settings below left as None.
        mask_size: side of the low-resolution mask.
        n_iter: Adam steps.
        lr: Adam learning rate.
        l1_coeff: weight of mean|1 - m| (area of the deletion).
        tv_coeff: weight of the total variation.
        tv_beta: exponent of the total variation.
        perturbation: 'median', 'blur', 'noise' or 'constant'.
        blur_size: odd kernel size of 'median' and 'blur'.
        blur_sigma: sigma of 'blur'.
        baseline: the 'constant' perturbation.
        noise_std: std of the noise added to the blended input at every step, in the space of the
            images given to the SimilarityModel (0: none).
        fixed_reference: False learns a reference mask too (both-images mode).
        batch_size: pairs per optimization batch (None: 64, the base's policy for forward and backward
            passes, :data:`whymatch.saliency.base.DEFAULT_BATCH_SIZE`).
        seed: seed of the noise (None: fresh randomness each call).
        show_progress: tqdm bar over the steps.
    """

    batch_kind = "pairs"

    def __init__(self, sim: SimilarityModel, *, preset: str = "real", mask_size: int | None = None,
                 n_iter: int | None = None, lr: float | None = None, l1_coeff: float | None = None,
                 tv_coeff: float | None = None, tv_beta: float | None = None, perturbation: str | None = None,
                 blur_size: int | None = None, blur_sigma: float = 10.0,
                 baseline: float | str | Tensor = 0.0, noise_std: float | None = None, fixed_reference: bool = True,
                 batch_size: int | None = None, seed: int | None = 0, show_progress: bool = False) -> None:
        super().__init__(sim, batch_size=batch_size, show_progress=show_progress)
        self.preset = V.choice("preset", preset, tuple(PRESETS))
        given = dict(mask_size=mask_size, n_iter=n_iter, lr=lr, l1_coeff=l1_coeff, tv_coeff=tv_coeff,
                     tv_beta=tv_beta, perturbation=perturbation, blur_size=blur_size, noise_std=noise_std)
        chosen = {k: PRESETS[self.preset][k] if v is None else v for k, v in given.items()}
        mask_size, n_iter, lr, l1_coeff, tv_coeff, tv_beta, perturbation, blur_size, noise_std = chosen.values()
        self.mask_size = V.positive_int("mask_size", mask_size)
        self.n_iter = V.positive_int("n_iter", n_iter)
        self.lr = V.real("lr", lr, low=0.0, open_low=True)
        self.l1_coeff = V.real("l1_coeff", l1_coeff, low=0.0)
        self.tv_coeff = V.real("tv_coeff", tv_coeff, low=0.0)
        self.tv_beta = V.real("tv_beta", tv_beta, low=0.0, open_low=True)
        self.perturbation = V.choice("perturbation", perturbation, PERTURBATIONS)
        self.blur_size = V.positive_int("blur_size", blur_size)
        if self.blur_size % 2 == 0:
            raise ValueError(f"blur_size must be odd, got {blur_size}")
        self.blur_sigma = V.real("blur_sigma", blur_sigma, low=0.0, open_low=True)
        self.baseline = baseline
        self.noise_std = V.real("noise_std", noise_std, low=0.0)
        self.fixed_reference = bool(fixed_reference)
        _common.generator(seed)  # validates the seed
        self.seed = seed
        #: mean similarity of the perturbed pairs at each step of the last batch (for inspection)
        self.last_history: list[float] = []

    # ------------------------------------------------------------ pieces
    def _generators(self, seed: int | None, n: int, offset: int) -> list[torch.Generator]:
        if seed is None:
            base = int(torch.randint(0, 2**62, (1,), generator=_common.generator(None)))
        else:
            base = seed
        return [_common.generator((base * 1_000_003 + offset + i) % 2**63) for i in range(n)]

    def perturbed(self, images: Tensor, gens: list[torch.Generator]) -> Tensor:
        """P(x) for each image (B, C, H, W), the fully-deleted version the mask blends towards."""
        x = images.float()
        if self.perturbation == "median":
            return median_blur(x, self.blur_size)
        if self.perturbation == "blur":
            return gaussian_blur(x, self.blur_size, self.blur_sigma)
        if self.perturbation == "noise":
            eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device)
            return x + eps
        return torch.stack([_common.baseline_image(self.baseline, xi) for xi in x])

    def _noise(self, shape: torch.Size, gens: list[torch.Generator], device: torch.device) -> Tensor | None:
        if self.noise_std == 0:
            return None
        return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device) * self.noise_std

    def _regularizer(self, m: Tensor) -> Tensor:
        return self.l1_coeff * (1 - m).abs().flatten(1).mean(1) + self.tv_coeff * _tv(m, self.tv_beta)

    def _optimize(self, q: Tensor, r: Tensor | None, r_emb: Tensor | None, condition: object,
                  gens: list[torch.Generator]) -> tuple[Tensor, Tensor | None]:
        """Masks (B, 1, s, s) for one batch; r is None in fixed-reference mode (r_emb given)."""
        sim = self.sim
        b, dev = q.shape[0], q.device
        s = self.mask_size
        both = r is not None
        size_q = tuple(q.shape[2:])
        pq = self.perturbed(q, gens)
        mq = torch.ones(b, 1, s, s, device=dev, requires_grad=True)
        params = [mq]
        if both:
            size_r = tuple(r.shape[2:])
            pr = self.perturbed(r, gens)
            mr = torch.ones(b, 1, s, s, device=dev, requires_grad=True)
            params.append(mr)
        opt = torch.optim.Adam(params, lr=self.lr)
        history: list[float] = []  # this call's own list: a concurrent call never appends to it
        steps = range(self.n_iter)
        if self.show_progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="Mask", unit="step")
        for step in steps:
            with torch.enable_grad():
                up = F.interpolate(mq, size=size_q, mode="bilinear", align_corners=False)
                xq = up * q + (1 - up) * pq
                nq = self._noise(q.shape[1:], gens, dev)
                if nq is not None:
                    xq = xq + nq
                if both:
                    upr = F.interpolate(mr, size=size_r, mode="bilinear", align_corners=False)
                    xr = upr * r + (1 - upr) * pr
                    nr = self._noise(r.shape[1:], gens, dev)
                    if nr is not None:
                        xr = xr + nr
                    if size_q == size_r:
                        emb = sim(torch.cat([xq, xr]))
                        eq, er = emb[:b], emb[b:]
                    else:
                        eq, er = sim(xq), sim(xr)
                else:
                    eq, er = sim(xq), r_emb
                score = sim.pairwise(eq, er, condition).diagonal()
                loss = score + self._regularizer(mq)
                if both:
                    loss = loss + self._regularizer(mr)
                if not score.requires_grad:
                    raise ValueError("Mask needs gradients of the similarity w.r.t. the input image, but the "
                                     "model produced none (does its forward run under torch.no_grad(), detach, "
                                     "or convert to numpy?)")
                grads = torch.autograd.grad(loss.sum(), params)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            with torch.no_grad():
                for p in params:
                    p.clamp_(0.0, 1.0)
            history.append(float(score.detach().mean()))  # one synchronization per step, as before
            if not math.isfinite(history[-1]):
                what = f"the masked {'pairs' if both else 'queries'} at step {step}"
                _common.check_output(eq.detach(), what)
                if both:
                    _common.check_output(er.detach(), f"the masked references at step {step}")
                _common.check_output(score.detach(), what, "similarity scores")
        self.last_history = history
        return mq.detach(), (mr.detach() if both else None)

    # ------------------------------------------------------------ API
    def attribute_pairs(self, queries: Tensor, references: Tensor | None = None, *,
                        reference_embeddings: Tensor | None = None, condition: object = None,
                        seed: int | None = None,
                        return_reference_maps: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Saliency of B independent pairs (queries[i], references[i]), optimized ``batch_size`` at a time.

        Args:
            queries: (B, C, H, W).
            references: (B, C, Hr, Wr), or ``reference_embeddings`` (B, D) in fixed-reference mode.
            condition: passed to a conditional similarity.
            seed: overrides the constructor's seed for this call.
            return_reference_maps: both-images mode only: also return the references' maps (B, Hr, Wr).

        Returns:
            (B, H, W) float32 saliency 1 - up(m) in [0, 1] (and the reference maps).
        """
        sim = self.sim
        both = not self.fixed_reference
        if return_reference_maps and not both:
            raise ValueError("return_reference_maps needs fixed_reference=False (the reference is not masked)")
        q, r = self._pairs(queries, references, reference_embeddings, need_images=both)
        q, r = q.float(), r.float()
        from . import _cam

        _cam.warn_if_training(sim, "Mask")
        gens = self._generators(self.seed if seed is None else _seed(seed), q.shape[0], 0)
        q_maps, r_maps = [], []
        for i, j in self._batches(q.shape[0], "Mask pairs", bar=False):  # its bar counts the steps
            if both:
                mq, mr = self._optimize(q[i:j], r[i:j], None, condition, gens[i:j])
            else:
                if references is not None:
                    with torch.no_grad():
                        r_emb = _common.check_output(sim(r[i:j]), "the references")
                else:
                    r_emb = r[i:j].float()
                mq, mr = self._optimize(q[i:j], None, r_emb, condition, gens[i:j])
            q_maps.append(1 - F.interpolate(mq, size=tuple(q.shape[2:]), mode="bilinear", align_corners=False)[:, 0])
            if mr is not None:
                r_maps.append(1 - F.interpolate(mr, size=tuple(r.shape[2:]), mode="bilinear",
                                                align_corners=False)[:, 0])
        q_out = _common.check_maps(torch.cat(q_maps), "Mask")
        _common.warn_if_constant(q_out, "Mask", "the optimization kept (or deleted) the whole image evenly "
                                 "(too few steps, too large a regularizer, or a model that ignores the query)")
        if return_reference_maps:
            return q_out, _common.check_maps(torch.cat(r_maps), "Mask")
        return q_out

    def attribute(self, query: Tensor, references: Tensor | None = None, *,
                  reference_embeddings: Tensor | None = None, condition: object = None,
                  seed: int | None = None) -> Tensor:
        """Saliency (K, H, W) of the query for each of K references (K pairs optimized in one batch)."""
        queries, references, reference_embeddings = self._as_pairs(query, references, reference_embeddings)
        return self.attribute_pairs(queries, references,
                                    reference_embeddings=reference_embeddings, condition=condition, seed=seed)


def _seed(seed: object) -> int:
    _common.generator(seed)  # type check
    return seed  # type: ignore[return-value]
