"""RISE for similarity models (Petsiuk et al. 2018, as adapted by SANE, Plummer et al. 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..ops import _validate as V
from ..ops.reference import rise_grid_geometry
from ..similarity import SimilarityModel
from . import _common
from .base import Explainer, PairInputs

__all__ = ["RISE", "NORMALIZE"]

NORMALIZE = ("centered", "rise", "sane")
"""The ``normalize`` choices of :class:`RISE`; the first is the default."""


class RISE(Explainer):
    """Black-box saliency for a pair: which query pixels make it similar to each reference.

    N random low-resolution binary grids (s x s, each cell on with probability p)
    are upsampled bilinearly, shifted by a random offset within one cell and
    cropped to the query's size (the RISE construction; see
    :func:`whymatch.ops.reference.rise_masks` for the exact geometry). Each mask
    blends the query with a baseline; the similarity of every perturbed query to
    every reference weights its mask:

        s_nk = sim(f(m_n * q + (1 - m_n) * b), f(r_k))

    and the map is, per pixel (``normalize=``):

    - ``'centered'`` (default): S_k = sum_n (s_nk - mean_n s_nk) m_n / sum_n m_n,
      the mean score of the masks that keep the pixel minus the mean score of
      all masks. Zero means "keeping this pixel changes nothing"; positive
      pixels raise the similarity. It is the RISE sum of the centred scores,
      divided by the per-pixel mask density.
    - ``'rise'``: S_k = sum_n s_nk m_n / (N p) (RISE paper).
    - ``'sane'``: S_k = sum_n s_nk m_n / mean_n(m_n) per pixel (SANE's published code).

    Why centred by default: with a pretrained embedding every perturbed query stays
    fairly similar to the reference (cosines of 0.5-0.8), so the uncentred sums are
    dominated by the mean score times the per-pixel mask density (which varies with
    the random shifts, highest where the masks overlap most), not by the scores'
    variation: on real photos with EfficientNet-lite0 the 'rise' map's maximum
    lands on the shared object at chance rate (``benchmarks/realphoto_table.py``).
    'rise' and 'sane' maps also carry a constant offset (the mean score), so a
    metric that reads zero as "no effect" (``metrics.mass_on_mask``) needs centred maps.

    One query against K references costs one pass over the query's N
    perturbations: their embeddings meet all K reference embeddings in one
    matrix product. Masks are never stored at full size (fused kernels), so peak
    memory grows with ``batch_size``, not ``n_masks``.

    ``fixed_reference=False`` is SANE's "both images" mode: each reference is
    also perturbed by ``n_reference_masks`` RISE masks and the query map is the
    mean of the RISE maps against every perturbed reference. Because the map is
    linear in the scores, that mean is computed exactly as one map of the
    averaged scores, for N + K * M forward passes instead of N * M.

    Args:
        sim: the SimilarityModel to explain.
        n_masks: N, the number of query masks (published: 2000 SANE, 4000-8000 RISE).
        grid: s, the side of the low-resolution grid. Default 6 (was 8), chosen on the validation split
            of ``benchmarks/realphoto_table.py --sweep`` (EfficientNet-lite0, 8 pairs, 112 px, 300 masks,
            p 0.5): pointing 0.88 at s = 6, 0.62 at 4, 0.50 at 8; p = 0.3 at s = 6 gave 0.75.
        p: probability that a grid cell keeps its pixels, in (0, 1).
        batch_size: perturbed images per forward pass (None: 256, the base's policy for forward passes,
            :data:`whymatch.saliency.base.DEFAULT_BATCH_SIZE`).
        baseline: what masked pixels become: a number, 'mean' (per-channel mean
            of the image) or a tensor broadcastable to (C, H, W), in the space of
            the images given to the SimilarityModel.
        normalize: 'centered' (centre the scores, divide by the mask density: zero = no
            effect), 'rise' (divide by N * p) or 'sane' (divide by N * mean mask).
        fixed_reference: False perturbs the references too (SANE's both-images mode).
        n_reference_masks: M, masks per reference when ``fixed_reference=False`` (SANE: 30).
        seed: seed of the masks (None: a fresh random seed each call).
        show_progress: show a tqdm progress bar.
    """

    def __init__(self, sim: SimilarityModel, n_masks: int = 2000, grid: int = 6, p: float = 0.5, *,
                 batch_size: int | None = None, baseline: float | str | Tensor = 0.0, normalize: str = "centered",
                 fixed_reference: bool = True, n_reference_masks: int = 30, seed: int | None = 0,
                 show_progress: bool = False) -> None:
        super().__init__(sim, batch_size=batch_size, show_progress=show_progress)
        self.n_masks = V.positive_int("n_masks", n_masks)
        self.grid = V.positive_int("grid", grid)
        self.p = V.real("p", p, low=0.0, high=1.0, open_low=True, open_high=True)
        self.baseline = baseline
        self.normalize = V.choice("normalize", normalize, NORMALIZE)
        self.fixed_reference = bool(fixed_reference)
        self.n_reference_masks = V.positive_int("n_reference_masks", n_reference_masks)
        _common.generator(seed)  # validates the seed
        self.seed = seed

    def generate_masks(self, size: tuple[int, int], n: int, gen: torch.Generator,
                       device: torch.device) -> tuple[Tensor, Tensor]:
        """Grids (n, s, s) float32 and shifts (n, 2) int64 for images of ``size``, on ``device``."""
        s = self.grid
        cell_h, cell_w, _, _ = rise_grid_geometry(size, s)
        grids = (torch.rand(n, s, s, generator=gen) < self.p).float()
        shifts = torch.stack([torch.randint(0, cell_h, (n,), generator=gen),
                              torch.randint(0, cell_w, (n,), generator=gen)], dim=1)
        return grids.to(device), shifts.to(device)

    @torch.no_grad()
    def _perturbed_embeddings(self, image: Tensor, grids: Tensor, shifts: Tensor, baseline: Tensor,
                              desc: str) -> Tensor:
        sim = self.sim
        dtype = sim.input_dtype(image.device)
        chunks = []
        fmt = torch.channels_last if sim.channels_last else torch.contiguous_format
        # one model input buffer, reused by every batch (no per-batch allocation)
        size = self._batch_for(image)
        buf = torch.empty((min(size, grids.shape[0]), *image.shape), dtype=dtype, device=image.device,
                          memory_format=fmt)
        for i, j in self._batches(grids.shape[0], desc, size=size):
            batch = ops.rise_apply(grids[i:j], shifts[i:j], image, baseline, channels_last=sim.channels_last,
                                   out=buf[:j - i])
            emb = sim(batch)
            if emb.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():
                emb = emb.clone()  # the embedder returned a view of its input: keep it from being overwritten
            chunks.append(emb)
        return torch.cat(chunks)

    @torch.no_grad()
    def attribute(self, query: Tensor, references: Tensor | None = None, *,
                  reference_embeddings: Tensor | None = None, condition: object = None,
                  seed: int | None = None) -> Tensor:
        """Saliency of the query for each reference.

        Args:
            query: (C, H, W) or (1, C, H, W) image on the model's device.
            references: (K, C, Hr, Wr) or (C, Hr, Wr) images.
            reference_embeddings: (K, D) embeddings instead of ``references``
                (fixed-reference mode only): a retrieval system passes the
                gallery embeddings it already has.
            condition: passed to the model's conditional similarity, if it has one.
            seed: overrides the constructor's seed for this call.

        Returns:
            (K, H, W) float32 saliency maps on the query's device, signed and
            unnormalized (higher: the pixel supports the similarity more).
        """
        sim = self.sim
        inp = self._inputs(query, references, reference_embeddings, need_images=not self.fixed_reference)
        q = inp.query
        c, h, w = q.shape
        self._check_settings(inp)
        gen = _common.generator(self.seed if seed is None else seed)
        grids, shifts = self.generate_masks((h, w), self.n_masks, gen, q.device)
        base = _common.baseline_image(self.baseline, q)
        emb = _common.check_output(self._perturbed_embeddings(q, grids, shifts, base, "RISE query masks"),
                                   "the perturbed queries (RISE masks)")

        if self.fixed_reference:
            scores = sim.pairwise(emb, inp.ref_embeddings, condition)  # (N, K)
        else:
            refs = inp.references
            m = self.n_reference_masks
            scores = torch.zeros(self.n_masks, refs.shape[0], device=q.device)
            for k in range(refs.shape[0]):
                r = refs[k].float()
                rg, rs = self.generate_masks(tuple(r.shape[1:]), m, gen, q.device)
                r_emb = self._perturbed_embeddings(r, rg, rs, _common.baseline_image(self.baseline, r),
                                                   f"RISE reference {k} masks")
                _common.check_output(r_emb, f"the perturbed reference {k} (RISE masks)")
                scores[:, k] = sim.pairwise(emb, r_emb, condition).mean(dim=1)

        _common.check_output(scores, "the perturbed queries against the references", "similarity scores")
        k = scores.shape[1]
        if self.normalize == "rise":
            sal = ops.rise_saliency(grids, shifts, scores, (h, w))
            return self._checked(sal / (self.n_masks * self.p), 0.0)
        score_scale = float(scores.abs().max())
        if self.normalize == "centered":
            # centre the scores, then accumulate (the accumulation is linear in the scores)
            scores = scores - scores.mean(dim=0, keepdim=True)
        ones = torch.ones(self.n_masks, 1, device=q.device)
        both = ops.rise_saliency(grids, shifts, torch.cat([scores, ones], dim=1), (h, w))
        mask_sum = both[k:]  # (1, H, W): sum_n m_n
        # sum_n s_n m_n / sum_n m_n ('centered') or x N ('sane'); a pixel no mask ever kept gets 0, not NaN.
        scale = 1.0 if self.normalize == "centered" else float(self.n_masks)
        # centring rounds: a spread of the scores below float32 resolution is no signal
        atol = 1e-6 * score_scale if self.normalize == "centered" else 0.0
        return self._checked(torch.where(mask_sum > 0, both[:k] * scale / mask_sum.clamp_min(1e-12),
                                         torch.zeros_like(both[:k])), atol)

    def _checked(self, maps: Tensor, atol: float) -> Tensor:
        _common.check_maps(maps, "RISE")
        _common.warn_if_constant(maps, "RISE", "no mask changed the similarity (the model ignores the query, "
                                 "or the baseline equals the image)", atol=atol)
        return maps

    def _check_settings(self, inp: PairInputs) -> None:
        _common.check_drawn(self.n_masks, self.grid * self.grid, "masks", "n_masks and grid")
        if not self.fixed_reference:
            _common.check_drawn(self.n_reference_masks, self.grid * self.grid, "reference masks",
                                "n_reference_masks and grid")
        sizes = [tuple(inp.query.shape[1:])]
        if not self.fixed_reference and inp.references is not None:
            sizes.append(tuple(inp.references.shape[2:]))
        for name, (h, w) in zip(("query", "references"), sizes):
            if self.grid > max(h, w):
                raise ValueError(f"grid must be at most the larger side of the {name} ({max(h, w)}; a grid finer "
                                 f"than the pixels is meaningless), got grid={self.grid} for {h}x{w} {name}")
