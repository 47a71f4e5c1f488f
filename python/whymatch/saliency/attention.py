"""Gradient similarity attention for Siamese, triplet and quadruplet models (Zheng et al.).

The attention of an image in a tuple comes from the embedding alone: no
classifier, no similarity head. Published code for the method is not public;
this follows the paper (see ../shared/REFERENCES.md in the project).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import _validate as V
from ..similarity import SimilarityModel
from . import _cam, _common
from .base import Explainer

__all__ = ["SimilarityAttention", "similarity_weights", "TUPLE_SIZES"]

#: Images per tuple for each mode.
TUPLE_SIZES = {"siamese": 2, "triplet": 3, "quadruplet": 4}
_QUERY_NAMES = ("query", "references", "negatives", "negatives2")  # the members in attribute()'s words
_MEMBER_NAMES = {"siamese": ("x1", "x2"), "triplet": ("anchor", "positive", "negative"),
                 "quadruplet": ("anchor", "positive", "negative1", "negative2")}


def similarity_weights(mode: str, embeddings: list[Tensor] | tuple[Tensor, ...],
                       positive: bool | Tensor = True) -> Tensor:
    """The weight vector w (B, D) that says which embedding dimensions make a tuple (dis)similar.

    ``embeddings`` are the tuple's unit-normalized embeddings, each (B, D):

    ==========  =====================  ==============================================
    mode        embeddings             w
    ==========  =====================  ==============================================
    siamese     f1, f2                 1 - |f1 - f2| (positive pair), |f1 - f2| (negative)
    triplet     fa, fp, fn             (1 - |fa - fp|) * |fa - fn|
    quadruplet  fa, fp, fn1, fn2       (1 - |fa - fp|) * |fa - fn1| * |fn1 - fn2|
    ==========  =====================  ==============================================

    The quadruplet product multiplies the factors of the two ranking terms of the
    quadruplet loss (Chen et al. 2017): a-p closer than a-n1, and a-p closer than n1-n2.

    Args:
        positive: siamese only: whether each pair is a positive pair (a bool or a (B,) bool tensor).
    """
    V.choice("mode", mode, tuple(TUPLE_SIZES))
    n = TUPLE_SIZES[mode]
    if len(embeddings) != n:
        raise ValueError(f"mode {mode!r} takes {n} embeddings per tuple, got {len(embeddings)}")
    if mode == "siamese":
        f1, f2 = embeddings
        diff = (f1 - f2).abs()
        if isinstance(positive, Tensor):
            pos = V.shape("positive", positive.to(torch.bool), (f1.shape[0],))
            return torch.where(pos[:, None], 1 - diff, diff)
        return 1 - diff if positive else diff
    if mode == "triplet":
        fa, fp, fn = embeddings
        return (1 - (fa - fp).abs()) * (fa - fn).abs()
    fa, fp, fn1, fn2 = embeddings
    return (1 - (fa - fp).abs()) * (fa - fn1).abs() * (fn1 - fn2).abs()


class SimilarityAttention(_cam.TargetLayers, Explainer):
    """Gradient attention maps of every image of a Siamese pair, triplet or quadruplet.

    For a tuple with unit-normalized embeddings f_1..f_T (T = 2, 3, 4), the weight
    vector w (:func:`similarity_weights`) marks the embedding dimensions that make
    the tuple what it is (shared by a positive pair, different from the negative).
    Each image i gets a sample score s_i = w . f_i, and its attention map is the
    Grad-CAM of that score at the target layer:

        M_i = ReLU(sum_c alpha_c A_i^c),   alpha_c = mean_{x,y} d s_i / d A_i^c(x, y)

    upsampled bilinearly to the image size. w is treated as a constant (detached),
    like the class weights of Grad-CAM, so the images of a tuple do not exchange
    gradients and the whole batch of tuples costs one forward and one backward pass.

    With several target layers, each layer's map is scaled by its maximum and the
    scaled maps are averaged (:func:`whymatch.saliency._cam.combine_layers`).

    Hooks are registered only for the duration of each call, so none is left on
    the model, and they record only the calling thread's forward passes, so one
    explainer and one model may serve several threads at once. The object is also a
    context manager (``with SimilarityAttention(...) as sa:``) for symmetry with
    pytorch-grad-cam. The model should be in eval mode: in training mode BatchNorm
    mixes the images of a batch. :meth:`check` validates a call (inputs, target
    layers, finite embeddings) with one small forward and backward pass; a map that
    comes out constant (e.g. all zero) gives a RuntimeWarning naming the layer.

    Args:
        sim: the SimilarityModel (or a bare embedding nn.Module, wrapped with cosine similarity).
            ``model=`` (its old name) still works, with a DeprecationWarning.
        target_layers: a name relative to the embedder (e.g. 'layer4'), a module, or a list of
            them; None picks the last module that runs once per forward pass and outputs a feature
            map with more than one position that the gradient reaches (``.target_layer_names``
            tells which, after the first call or :meth:`check`). Every target layer must run
            exactly once per forward pass (not a module shared by several blocks).
        mode: 'siamese', 'triplet' or 'quadruplet'.
        batch_size: tuples per forward/backward pass (None: 64, the base's policy for forward and backward
            passes, :data:`whymatch.saliency.base.DEFAULT_BATCH_SIZE`).
        show_progress: show a tqdm progress bar over the batches.

    Example::

        sa = SimilarityAttention(sim, "layer4", mode="triplet")
        m_a, m_p, m_n = sa.attribute_tuples(anchors, positives, negatives)   # each (B, H, W)
    """

    batch_kind = "pairs"
    wraps_modules = True

    def __init__(self, sim: SimilarityModel | nn.Module | None = None, target_layers: object = None,
                 mode: str = "siamese", *, batch_size: int | None = None, show_progress: bool = False,
                 model: SimilarityModel | nn.Module | None = None) -> None:
        if model is not None:  # the first argument's name before every explainer took ``sim``
            if sim is not None:
                raise TypeError("give the model as sim (model is its old name), not both")
            import warnings

            warnings.warn("SimilarityAttention(model=...) is deprecated: the first argument is sim, as in every "
                          "explainer", DeprecationWarning, stacklevel=2)
            sim = model
        if sim is None:
            raise TypeError("SimilarityAttention() missing the similarity model: sim, a whymatch.SimilarityModel "
                            "or an embedding nn.Module")
        super().__init__(sim, batch_size=batch_size, show_progress=show_progress)
        self.mode = V.choice("mode", mode, tuple(TUPLE_SIZES))
        self._layers = _cam.resolve_target_layers(self.sim, target_layers)

    # ------------------------------------------------------------ core
    def _forward(self, x: Tensor, layers) -> tuple[Tensor, list[Tensor]]:
        """Unit-normalized embeddings and the target activations of one batch, with graph."""
        with _cam.ActivationCapture(layers) as cap, torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)  # a gradient path even when the weights are frozen
            e = self.sim(x)
        _common.check_output(e.detach(), "the tuple images")
        return F.normalize(e, dim=1), cap.single_maps()

    def _tuple_batch(self, images: list[Tensor], positive: bool | Tensor, create_graph: bool) -> list[Tensor]:
        layers = self._layers_for(images[0])
        sizes = {tuple(x.shape[2:]) for x in images}
        if len(sizes) == 1:  # one forward pass for every image of every tuple
            f_all, acts_all = self._forward(torch.cat(images), layers)
            fs = list(f_all.chunk(len(images)))
            acts = [list(a.chunk(len(images))) for a in acts_all]  # [layer][member]
        else:
            outs = [self._forward(x, layers) for x in images]
            fs = [o[0] for o in outs]
            acts = [[o[1][li] for o in outs] for li in range(len(layers))]
        w = similarity_weights(self.mode, [f.detach() for f in fs], positive)
        score = sum((w * f).sum() for f in fs)
        flat = [a for per_layer in acts for a in per_layer]
        _cam.check_differentiable(score, flat, "SimilarityAttention")
        if len(sizes) == 1:
            grads_all = torch.autograd.grad(score, acts_all, create_graph=create_graph)
            grads = [list(g.chunk(len(images))) for g in grads_all]
        else:
            g = torch.autograd.grad(score, flat, create_graph=create_graph)
            grads = [list(g[li * len(images):(li + 1) * len(images)]) for li in range(len(layers))]
        maps = []
        for m, x in enumerate(images):
            per_layer = [_cam.grad_cam(acts[li][m], grads[li][m], tuple(x.shape[2:])) for li in range(len(layers))]
            out = _cam.combine_layers(per_layer)
            _common.check_maps(out.detach(), "SimilarityAttention")
            _cam.warn_if_constant(out, "SimilarityAttention", layers)
            maps.append(out if create_graph else out.detach())
        return maps

    def attribute_tuples(self, *images: Tensor, positive: bool | Tensor = True,
                         create_graph: bool = False) -> tuple[Tensor, ...]:
        """Attention maps of every image of B tuples.

        Args:
            *images: T batches (B, C, H_t, W_t), one per member of the tuple: (x1, x2) for
                'siamese', (anchor, positive, negative) for 'triplet', (anchor, positive,
                negative1, negative2) for 'quadruplet'.
            positive: siamese only: are the pairs positive (bool or (B,) bool tensor).
            create_graph: keep the maps differentiable w.r.t. the model's parameters and
                inputs (for training losses built on the attention, e.g. similarity mining).

        Returns:
            T tensors (B, H_t, W_t) float32, non-negative, unnormalized, on the model's device.
        """
        return self._attribute_tuples(images, positive, create_graph, None)

    def _attribute_tuples(self, images: tuple[Tensor, ...], positive: bool | Tensor, create_graph: bool,
                          names: tuple[str, ...] | None) -> tuple[Tensor, ...]:
        imgs, positive = self._check_tuples(images, positive, names)
        b = imgs[0].shape[0]
        _cam.warn_if_training(self.sim, "SimilarityAttention")
        out: list[list[Tensor]] = [[] for _ in imgs]
        for i, j in self._batches(b, "SimilarityAttention tuples"):
            pos = positive[i:j] if isinstance(positive, Tensor) else positive
            for m, mp in enumerate(self._tuple_batch([x[i:j].float() for x in imgs], pos, create_graph)):
                out[m].append(mp)
        return tuple(torch.cat(o) for o in out)

    def _check_tuples(self, images: tuple[Tensor, ...], positive: bool | Tensor,
                      names: tuple[str, ...] | None = None) -> tuple[list[Tensor], bool | Tensor]:
        """Validated tuple members (each (B, C, H_t, W_t) on the model's device) and ``positive``."""
        n = TUPLE_SIZES[self.mode]
        if len(images) != n:
            raise ValueError(f"mode {self.mode!r} takes {n} image batches (one per tuple member), got {len(images)}")
        dev = self.sim.device
        names = names or _MEMBER_NAMES[self.mode]
        imgs = [self.sim.check_images(names[i], x, device=dev) for i, x in enumerate(images)]
        b = imgs[0].shape[0]
        for i, x in enumerate(imgs):
            if x.shape[0] != b:
                raise ValueError(f"every tuple member must hold the same number of images: got {b} and "
                                 f"{x.shape[0]} (member {i})")
        if isinstance(positive, Tensor):
            if positive.dtype not in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
                got = str(positive.dtype).replace("torch.", "")
                raise ValueError(f"positive must be a bool tensor, got dtype {got}")
            positive = V.shape("positive", positive.to(dev), (b,)).to(torch.bool)
        elif not isinstance(positive, bool):
            raise TypeError(f"positive must be a bool or a (B,) bool tensor, got {type(positive).__name__}")
        return imgs, positive

    def check(self, query: Tensor, references: Tensor, *, negatives: Tensor | None = None,
              negatives2: Tensor | None = None, positive: bool | Tensor = True) -> None:
        """Validate an :meth:`attribute` call cheaply: the inputs, the target layers (one forward and backward
        pass of one image: each layer must run once and output a feature map with h * w > 1 that the gradient
        reaches; picks the layer when ``target_layers=None``) and finite embeddings of every tuple member."""
        members = self._members(query, references, negatives, negatives2)
        imgs, _ = self._check_tuples(tuple(members), positive, _QUERY_NAMES)
        self._check_layers(imgs[0][:1])
        with torch.no_grad():
            for name, x in zip(_QUERY_NAMES, imgs):
                _common.check_output(self.sim(x[:1].float()), f"the {name}")

    def _members(self, query: Tensor, references: Tensor, negatives: Tensor | None,
                 negatives2: Tensor | None) -> list[Tensor]:
        if references is None:
            raise ValueError("references must be given: (K, C, H, W) or (C, H, W) images")
        queries, refs, _ = self._as_pairs(query, references, None)
        k = refs.shape[0]
        members = [queries, refs]
        extra = {"triplet": ("negatives",), "quadruplet": ("negatives", "negatives2")}.get(self.mode, ())
        for name, t in (("negatives", negatives), ("negatives2", negatives2)):
            if name not in extra:
                if t is not None:
                    used = "'triplet' and 'quadruplet'" if name == "negatives" else "'quadruplet'"
                    raise ValueError(f"{name} is only used in mode {used}, not {self.mode!r}")
                continue
            if t is None:
                raise ValueError(f"mode {self.mode!r} needs {name} (K, C, H, W) or (C, H, W)")
            t = V.tensor(name, t, ndim=(3, 4))
            t = t[None].expand(k, -1, -1, -1) if t.dim() == 3 else t
            if t.shape[0] != k:
                raise ValueError(f"{name} must hold one image or K={k} images, got {t.shape[0]}")
            members.append(t)
        return members

    def attribute(self, query: Tensor, references: Tensor, *, negatives: Tensor | None = None,
                  negatives2: Tensor | None = None, positive: bool | Tensor = True,
                  return_all: bool = False) -> Tensor | tuple[Tensor, ...]:
        """Attention of the query in each of K tuples (query, reference k[, negative k[, negative2 k]]).

        The explainer contract's call: ``attribute(query, references)`` returns (K, H, W)
        maps of the query. In 'triplet' mode the query is the anchor, each reference a
        positive and ``negatives`` (K, C, H, W) or one (C, H, W) image the negatives;
        'quadruplet' also takes ``negatives2``. ``return_all=True`` returns the maps of
        every tuple member (query maps first).
        """
        members = self._members(query, references, negatives, negatives2)
        maps = self._attribute_tuples(tuple(members), positive, False, _QUERY_NAMES)
        return maps if return_all else maps[0]
