"""Grad-CAM of the similarity score itself: the baseline users of pytorch-grad-cam build by hand."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..similarity import SimilarityModel
from . import _cam, _common
from .base import Explainer, PairInputs

__all__ = ["EmbeddingGradCAM"]


class EmbeddingGradCAM(_cam.TargetLayers, Explainer):
    """Grad-CAM with the pair's similarity as the target.

    For a query q and a reference r, with A the query's activations at the target
    layer and s = sim(f(q), f(r)) the SimilarityModel's own similarity (cosine for
    the shipped model):

        M = ReLU(sum_c alpha_c A^c),   alpha_c = mean_{x,y} d s / d A^c(x, y)

    upsampled bilinearly to the query's size. This is what a pytorch-grad-cam user
    gets with a custom "similarity to this embedding" target. Unlike
    :class:`~whymatch.saliency.SimilarityAttention` it needs no tuple and no
    weight vector, and it follows the model's similarity function exactly
    (including conditional similarities).

    ``return_reference_maps=True`` differentiates the same score w.r.t. the
    reference's activations too (both images of the pair explained by one backward).

    Cost: K forward passes of the query (one per reference, batched) and one backward.
    Hooks are registered only during a call and record only the calling thread's
    forward passes (safe from several threads on one model). The model should be in
    eval mode. :meth:`check` validates a call cheaply; constant maps warn.

    Args:
        sim: the SimilarityModel (or a bare embedding nn.Module, wrapped with cosine similarity).
        target_layers: a name relative to the embedder (e.g. 'layer4'), a module, or a list of them;
            None picks the last module that runs once per forward pass and outputs a feature map
            with more than one position that the gradient reaches.
        batch_size: pairs per forward/backward pass (None: 64, the base's policy for forward and backward
            passes, :data:`whymatch.saliency.base.DEFAULT_BATCH_SIZE`).
        show_progress: show a tqdm progress bar over the batches.
    """

    batch_kind = "pairs"
    wraps_modules = True

    def __init__(self, sim: SimilarityModel | nn.Module, target_layers: object = None, *,
                 batch_size: int | None = None, show_progress: bool = False) -> None:
        super().__init__(sim, batch_size=batch_size, show_progress=show_progress)
        self._layers = _cam.resolve_target_layers(self.sim, target_layers)

    def _check_settings(self, inp: PairInputs) -> None:
        """The target layers, in :meth:`check` after the inputs, embeddings and scores: one forward and backward
        pass of the query (each layer must run once and output a feature map with h * w > 1 that the gradient
        reaches; picks the layer when ``target_layers=None``)."""
        self._check_layers(inp.query[None])

    def _maps(self, x: Tensor, acts: list[Tensor], grads: tuple[Tensor, ...]) -> Tensor:
        size = tuple(x.shape[2:])
        return _cam.combine_layers([_cam.grad_cam(a, g, size) for a, g in zip(acts, grads)]).detach()

    def attribute_pairs(self, queries: Tensor, references: Tensor | None = None, *,
                        reference_embeddings: Tensor | None = None, condition: object = None,
                        return_reference_maps: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Maps of B independent pairs (queries[i], references[i]).

        Args:
            queries: (B, C, H, W).
            references: (B, C, Hr, Wr), or ``reference_embeddings`` (B, D).
            condition: passed to a conditional similarity.
            return_reference_maps: also return the references' maps (B, Hr, Wr).

        Returns:
            (B, H, W) float32 query maps (and the reference maps), non-negative, unnormalized.
        """
        sim = self.sim
        if return_reference_maps and references is None:
            raise ValueError("return_reference_maps needs reference images, not reference_embeddings")
        q, r = self._pairs(queries, references, reference_embeddings, need_images=False)
        layers = self._layers_for(q)
        _cam.warn_if_training(sim, "EmbeddingGradCAM")
        q_maps, r_maps = [], []
        for i, j in self._batches(q.shape[0], "EmbeddingGradCAM pairs"):
            qx = q[i:j].float().detach().requires_grad_(True)
            with torch.enable_grad():
                with _cam.ActivationCapture(layers) as cap_q:
                    fq = sim(qx)
                acts_q = cap_q.single_maps()
                _common.check_output(fq.detach(), "the queries")
                acts_r: list[Tensor] = []
                if references is None:
                    fr = r[i:j].float()
                elif return_reference_maps:
                    rx = r[i:j].float().detach().requires_grad_(True)
                    with _cam.ActivationCapture(layers) as cap_r:
                        fr = sim(rx)
                    acts_r = cap_r.single_maps()
                else:
                    with torch.no_grad():
                        fr = sim(r[i:j].float())
                if references is not None:
                    _common.check_output(fr.detach(), "the references")
                pair = sim.pairwise(fq, fr, condition).diagonal()
                _common.check_output(pair.detach(), "the queries against the references", "similarity scores")
                score = pair.sum()
            _cam.check_differentiable(score, acts_q + acts_r, "EmbeddingGradCAM")
            grads = torch.autograd.grad(score, acts_q + acts_r)
            q_maps.append(self._maps(qx, acts_q, grads[:len(acts_q)]))
            if acts_r:
                r_maps.append(self._maps(rx, acts_r, grads[len(acts_q):]))
        q_out = _common.check_maps(torch.cat(q_maps), "EmbeddingGradCAM")
        _cam.warn_if_constant(q_out, "EmbeddingGradCAM", layers)
        if return_reference_maps:
            r_out = _common.check_maps(torch.cat(r_maps), "EmbeddingGradCAM")
            _cam.warn_if_constant(r_out, "EmbeddingGradCAM (reference maps)", layers)
            return q_out, r_out
        return q_out

    def attribute(self, query: Tensor, references: Tensor | None = None, *,
                  reference_embeddings: Tensor | None = None, condition: object = None,
                  return_reference_maps: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Maps (K, H, W) of the query for each of K references (or reference embeddings (K, D))."""
        queries, references, reference_embeddings = self._as_pairs(query, references, reference_embeddings)
        return self.attribute_pairs(queries, references,
                                    reference_embeddings=reference_embeddings, condition=condition,
                                    return_reference_maps=return_reference_maps)
