"""SANE: a saliency map plus the attribute that best explains why two images match.

For a pair (query q, reference r), SANE (Plummer et al., ECCV 2020, section 3.3) explains the
similarity with a saliency map m_q of the query (any black-box saliency explainer, RISE by
default) and ranks the attributes i of an attribute explanation model by (Eq. 4)

    e_i = phi1 * a_i + phi2 * cos(m_q, n_i) + phi3 * TCAV_i

- a_i: the attribute model's confidence that the query has attribute i (softmax over attributes);
- cos(m_q, n_i): how well the saliency map agrees with the attribute's activation map n_i of the
  query. Both maps are brought to the activation map's size (area resampling of the saliency)
  and normalized the way the attribute model was trained to match them
  (:func:`whymatch.attributes.losses.normalize_maps`, the saliency side with a temperature), then
  compared by cosine;
- TCAV_i: a prior over attributes, the TCAV score of attribute i for the similarity model
  (:class:`whymatch.attributes.tcav.TCAV`), the same for every pair.

Eq. 4's terms say how likely the query has attribute i and where it is, not how much THIS pair's
similarity relies on it. whymatch adds an optional fourth term, a per-pair concept sensitivity
(TCAV's directional derivative taken at the pair, :class:`whymatch.attributes.tcav.PairSensitivity`):

    e_i = phi1 * a_i + phi2 * cos(m_q, n_i) + phi3 * TCAV_i + phi4 * g_i * S_i(q, r)

- S_i(q, r) = s(f(q), f(r)) - s(f(q) + d_i, f(r)): the drop in similarity when the query's
  embedding moves along attribute i's removal direction d_i (from TCAV's CAVs, or, where the data
  set can re-render an image with one attribute changed, from measured counterfactual changes);
- g_i = a_i / max_k a_k, the query's relative confidence in attribute i (``gate='query'``), or the
  smaller of the query's and the reference's (``gate='pair'``: the attribute must be on both):
  a direction that removes an attribute the query does not have means nothing.

With three weights phi (or phi4 = 0) the ranking is the paper's Eq. 4.

The weights phi are chosen by :meth:`SANE.fit_phi` on held-out pairs against the attribute
deletion metric (:func:`whymatch.metrics.attributes.attribute_insertion_deletion`), as the paper
does. The explanation keeps the three terms, so a user sees why an attribute ranked first, and
the query's most likely attribute, which often differs from the one that explains the match.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import _validate as V
from ..saliency import _common, base as _base
from ..similarity import SimilarityModel
from .losses import normalize_maps
from .model import AttributeModel

__all__ = ["AttributeTerms", "AttributeExplanation", "SANE", "rank_scores", "phi_grid"]


@dataclass
class AttributeTerms:
    """The terms of Eq. 4 for P pairs (each (P, A) float32), plus the per-pair sensitivity.

    Attributes:
        confidence: a, the attribute model's confidences for each query.
        map_match: cos(m_q, n), agreement of each pair's saliency map with every activation map.
        tcav: the TCAV prior, broadcast to (P, A) (zeros when no prior was given).
        sensitivity: g * S, the gated per-pair concept sensitivity (zeros when SANE has none).
    """

    confidence: Tensor
    map_match: Tensor
    tcav: Tensor
    sensitivity: Tensor | None = None

    def __post_init__(self) -> None:
        if self.sensitivity is None:
            self.sensitivity = torch.zeros_like(self.confidence)

    def __len__(self) -> int:
        return self.confidence.shape[0]

    def __getitem__(self, index) -> AttributeTerms:
        return AttributeTerms(self.confidence[index], self.map_match[index], self.tcav[index],
                              self.sensitivity[index])  # type: ignore[index]


def rank_scores(terms: AttributeTerms, phi: Sequence[float]) -> Tensor:
    """e = phi1 * a + phi2 * cos(m_q, n) + phi3 * TCAV [+ phi4 * g * S] (SANE Eq. 4): (P, A) float32."""
    ph = _check_phi(phi)
    e = ph[0] * terms.confidence + ph[1] * terms.map_match + ph[2] * terms.tcav
    if len(ph) == 4 and ph[3]:
        e = e + ph[3] * terms.sensitivity
    return e


def _check_phi(phi: object) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in phi)  # type: ignore[union-attr]
    except TypeError:
        raise TypeError(f"phi must be three or four numbers (phi1, phi2, phi3[, phi4]), got {phi!r}") from None
    if len(vals) not in (3, 4):
        raise ValueError(f"phi must be three or four numbers (phi1, phi2, phi3[, phi4]), got {len(vals)}: {vals}")
    for name, v in zip(("phi1", "phi2", "phi3", "phi4"), vals):
        V.real(name, v, low=0.0)
    if not any(vals):
        raise ValueError(f"phi must have at least one positive weight, got {vals}")
    return vals  # type: ignore[return-value]


def phi_grid(values: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0), n: int = 3) -> list[tuple[float, ...]]:
    """Every phi from ``values``^n (n = 3, or 4 with the sensitivity weight) except all zeros, one per direction.

    Scaling all weights does not change a ranking, so tuples that are multiples of
    another are dropped (the first one met is kept).
    """
    if n not in (3, 4):
        raise ValueError(f"n must be 3 or 4 (the number of weights), got {n!r}")
    seen, out = set(), []
    for t in itertools.product(values, repeat=n):
        if max(t) <= 0:
            continue
        key = tuple(round(v / max(t), 6) for v in t)
        if key in seen:
            continue
        seen.add(key)
        out.append(tuple(float(v) for v in t))
    return out


@dataclass
class AttributeExplanation:
    """SANE's explanation of P pairs.

    Attributes:
        saliency: (P, H, W) float32 saliency map of each query for its reference (signed, unnormalized).
        scores: (P, A) e of Eq. 4.
        terms: the terms (:class:`AttributeTerms`).
        phi: the weights used.
        attribute_names: A names.
        similarity: (P,) similarity of each pair.
    """

    saliency: Tensor
    scores: Tensor
    terms: AttributeTerms
    phi: tuple[float, ...]
    attribute_names: tuple[str, ...]
    similarity: Tensor
    order: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.order = torch.sort(self.scores, dim=1, descending=True, stable=True).indices

    def __len__(self) -> int:
        return self.scores.shape[0]

    @property
    def top_attribute(self) -> Tensor:
        """(P,) int64: the attribute that best explains each match (highest e)."""
        return self.order[:, 0]

    @property
    def query_attribute(self) -> Tensor:
        """(P,) int64: the query's most likely attribute (highest confidence), for contrast."""
        return self.terms.confidence.argmax(1)

    def top_names(self) -> list[str]:
        return [self.attribute_names[i] for i in self.top_attribute.tolist()]

    def ranked(self, pair: int = 0, k: int = 5) -> list[dict]:
        """The k best attributes of one pair with their three terms, best first."""
        if not 0 <= pair < len(self):
            raise IndexError(f"pair must be in [0, {len(self)}), got {pair}")
        rows = []
        for j in self.order[pair, :k].tolist():
            rows.append({"attribute": self.attribute_names[j], "index": j, "score": float(self.scores[pair, j]),
                         "confidence": float(self.terms.confidence[pair, j]),
                         "map_match": float(self.terms.map_match[pair, j]),
                         "tcav": float(self.terms.tcav[pair, j]),
                         "sensitivity": float(self.terms.sensitivity[pair, j])})  # type: ignore[index]
        return rows


class SANE:
    """Saliency plus attribute explanations for image similarity (SANE, Plummer et al. 2020).

    Args:
        sim: the SimilarityModel whose matches are explained.
        attribute_model: an :class:`~whymatch.attributes.model.AttributeModel` (attribute confidences
            and activation maps of an image).
        tcav: the TCAV prior: (A,) scores (NaN, for an attribute TCAV could not score, counts as 0),
            or None (no prior; phi3 then has no effect).
        saliency: an explainer with ``.attribute(query, references) -> (K, H, W)``; default
            ``RISE(sim, n_masks=2000, grid=8, p=0.5, seed=0)``.
        phi: (phi1, phi2, phi3) of Eq. 4, or four weights with phi4 for the per-pair sensitivity
            (default equal weights; fit them with :meth:`fit_phi`).
        normalize: how saliency and activation maps are normalized before the cosine: 'softmax'
            (spatial softmax, the attribute model's training default) or 'l1'.
        temperature: softmax temperature of the saliency maps (activation maps: 1), as in
            :class:`~whymatch.attributes.losses.AttributeLoss`; use the value the attribute model
            was trained with (``whymatch train sane`` default 0.05: RISE maps are in similarity units).
        batch_size: images per attribute-model forward pass.
        saliency_scale: 'none' (maps as given) or 'max' (each map divided by its largest absolute
            value before the softmax, so the temperature means the same for any explainer; the
            shipped ShapesWorld settings use it).
        sensitivity: optional :class:`~whymatch.attributes.tcav.PairSensitivity` over ``sim``'s
            embeddings: the per-pair term g * S (module docstring); None: that term is 0.
        gate: 'query' (g_i = a_i / max a of the query) or 'pair' (the smaller of the query's and the
            reference's relative confidences).
    """

    def __init__(self, sim: SimilarityModel, attribute_model: AttributeModel, tcav: Tensor | None = None, *,
                 saliency: object = None, phi: Sequence[float] = (1.0, 1.0, 1.0), normalize: str = "softmax",
                 temperature: float = 0.05, batch_size: int = 64, saliency_scale: str = "none",
                 sensitivity: object = None, gate: str = "query") -> None:
        self.sim = _common.check_model(sim)
        if not isinstance(attribute_model, AttributeModel):
            raise TypeError(f"attribute_model must be a whymatch AttributeModel, got {type(attribute_model).__name__}")
        self.attribute_model = attribute_model
        n_attr = attribute_model.n_attributes
        if tcav is not None:
            V.tensor("tcav", tcav, ndim=1)
            V.shape("tcav", tcav, (n_attr,))
            if not tcav.is_floating_point():
                raise ValueError(f"tcav must hold float scores, got {tcav.dtype}")
            tcav = torch.nan_to_num(tcav.detach().float().cpu(), nan=0.0)
        self.tcav = tcav
        if saliency is None:
            from ..saliency import RISE

            saliency = RISE(sim, n_masks=2000, grid=8, p=0.5, seed=0)
        if not callable(getattr(saliency, "attribute", None)):
            raise TypeError(f"saliency must be an explainer with .attribute(query, references), "
                            f"got {type(saliency).__name__}")
        self.saliency = saliency
        self.phi = _check_phi(phi)
        self.normalize = V.choice("normalize", normalize, ("softmax", "l1"))
        self.temperature = V.real("temperature", temperature, low=0.0, open_low=True)
        self.batch_size = V.positive_int("batch_size", batch_size)
        self.saliency_scale = V.choice("saliency_scale", saliency_scale, ("none", "max"))
        from .tcav import PairSensitivity

        if sensitivity is not None and not isinstance(sensitivity, PairSensitivity):
            raise TypeError(f"sensitivity must be a PairSensitivity or None, got {type(sensitivity).__name__}")
        self.sensitivity = sensitivity
        self.gate = V.choice("gate", gate, ("query", "pair"))

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(self.attribute_model.attribute_names)

    # ------------------------------------------------------------ terms
    @torch.no_grad()
    def terms(self, queries: Tensor, saliency: Tensor, references: Tensor | None = None, *,
              condition: object = None) -> AttributeTerms:
        """Eq. 4's terms for P (query, saliency map) pairs.

        Args:
            queries: (P, C, H, W) query images (the attribute model's input space, as given to ``sim``).
            saliency: (P, Hs, Ws) saliency maps of the queries.
            references: (P, C, H, W) reference images; needed for the per-pair sensitivity term
                (when SANE has ``sensitivity``), ignored otherwise.
            condition: passed to a conditional similarity (sensitivity term only).

        Returns:
            :class:`AttributeTerms` with (P, A) tensors on the CPU.
        """
        queries = self.sim.check_images("queries", queries)
        p = queries.shape[0]
        V.tensor("saliency", saliency, ndim=3)
        if saliency.shape[0] != p:
            raise ValueError(f"saliency must hold one map per query ({p}), got {saliency.shape[0]}")
        V.finite("saliency", saliency)
        if self.saliency_scale == "max":
            mx = saliency.detach().abs().amax(dim=(1, 2), keepdim=True)
            saliency = torch.where(mx > 0, saliency / mx.clamp_min(1e-30), saliency)
        model = self.attribute_model
        dev = model.device
        conf, match = [], []
        was_training = model.training
        model.eval()
        try:
            for i in range(0, p, self.batch_size):
                out = model(queries[i:i + self.batch_size].to(dev))
                maps = out.maps.float()                                        # (b, A, h, w)
                h, w = maps.shape[-2:]
                sal = F.adaptive_avg_pool2d(saliency[i:i + self.batch_size].to(dev).float()[:, None], (h, w))
                m = normalize_maps(sal, self.normalize, self.temperature).flatten(1)  # (b, hw)
                n = normalize_maps(maps, self.normalize).flatten(2)            # (b, A, hw)
                match.append(F.cosine_similarity(n, m[:, None, :], dim=2).cpu())
                conf.append(out.confidences.float().cpu())
        finally:
            model.train(was_training)
        a = model.n_attributes
        confidence = torch.cat(conf) if conf else torch.zeros(0, a)
        map_match = torch.cat(match) if match else torch.zeros(0, a)
        prior = self.tcav if self.tcav is not None else torch.zeros(a)
        sens = None
        if self.sensitivity is not None:
            if references is None:
                raise ValueError("references must be given: this SANE has a per-pair sensitivity term")
            references = self.sim.check_images("references", references)
            if references.shape[0] != p:
                raise ValueError(f"references must hold one image per query ({p}), got {references.shape[0]}")
            sens = self._sensitivity(queries, references, confidence, condition)
        return AttributeTerms(confidence, map_match, prior.expand(p, a).clone(), sens)

    def _sensitivity(self, queries: Tensor, references: Tensor, confidence: Tensor, condition: object) -> Tensor:
        """g * S (P, A): the gated per-pair concept sensitivity (module docstring)."""
        sim = self.sim
        with torch.no_grad():
            eq = sim.embed(queries, self.batch_size).float()
            er = sim.embed(references, self.batch_size).float()
        sens = self.sensitivity
        if condition is not None:                      # a conditional similarity: the pair's own condition
            sens = copy.copy(sens)
            sens._tcav = copy.copy(sens._tcav)  # type: ignore[union-attr]
            sens._tcav._sim = lambda a, b: sim.pairwise(a, b, condition)  # type: ignore[union-attr]
        s = sens.sensitivities(eq, er).float().cpu()  # type: ignore[union-attr]
        gate = _relative(confidence)
        if self.gate == "pair":
            model = self.attribute_model
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    cr = torch.cat([model(references[i:i + self.batch_size].to(model.device)).confidences.float().cpu()
                                    for i in range(0, references.shape[0], self.batch_size)])
            finally:
                model.train(was)
            gate = torch.minimum(gate, _relative(cr))
        return gate * s

    # ------------------------------------------------------------ explain
    def explain(self, query: Tensor, references: Tensor, *, condition: object = None) -> AttributeExplanation:
        """Explain why ``query`` matches each of K references (one saliency pass for all K).

        Args:
            query: (C, H, W) or (1, C, H, W) image.
            references: (K, C, H, W) or (C, H, W).
            condition: passed to a conditional similarity.

        Returns:
            An :class:`AttributeExplanation` of the K pairs (query, reference k).
        """
        sim = self.sim
        queries, refs, _ = _base.query_as_pairs(sim, query, references, None)
        refs = sim.check_images("references", refs)
        maps = self.saliency.attribute(queries[0], refs, **({"condition": condition} if condition is not None else {}))
        return self._assemble(queries, refs, maps, condition)

    def explain_pairs(self, queries: Tensor, references: Tensor, *, saliency: Tensor | None = None,
                      condition: object = None, show_progress: bool = False) -> AttributeExplanation:
        """Explain P pairs (queries[i], references[i]); pairs that share a query share its saliency pass.

        Args:
            queries: (P, C, H, W); references: (P, C, H, W).
            saliency: optional (P, H, W) precomputed saliency maps (the explainer is then not run).
            condition: passed to a conditional similarity.
            show_progress: a progress bar over the distinct queries.

        Returns:
            An :class:`AttributeExplanation` of the P pairs.
        """
        sim = self.sim
        queries = sim.check_images("queries", queries)
        references = sim.check_images("references", references)
        p = queries.shape[0]
        if references.shape[0] != p:
            raise ValueError(f"references must hold one image per query ({p}), got {references.shape[0]}")
        if saliency is None:
            maps = torch.empty(p, *queries.shape[-2:], device=queries.device)
            groups: dict[int, list[int]] = {}
            for i in range(p):          # pairs with the same query tensor content share one pass
                key = next((j for j in groups if torch.equal(queries[j], queries[i])), i)
                groups.setdefault(key, []).append(i)
            items = list(groups.items())
            if show_progress:
                from tqdm.auto import tqdm

                items = tqdm(items, desc="SANE saliency", unit="query")
            extra = {"condition": condition} if condition is not None else {}
            for j, idx in items:
                maps[idx] = self.saliency.attribute(queries[j], references[idx], **extra).to(maps.device)
            saliency = maps
        else:
            V.tensor("saliency", saliency, ndim=3)
            V.shape("saliency", saliency, (p, None, None))
        return self._assemble(queries, references, saliency, condition)

    def _assemble(self, queries: Tensor, references: Tensor, saliency: Tensor, condition: object) -> AttributeExplanation:
        terms = self.terms(queries, saliency, references, condition=condition)
        sim = self.sim
        with torch.no_grad():
            eq = sim.embed(queries, self.batch_size)
            er = sim.embed(references, self.batch_size)
            s = torch.stack([sim.pairwise(eq[i:i + 1], er[i:i + 1], condition)[0, 0] for i in range(eq.shape[0])]) \
                if eq.shape[0] else eq.new_zeros(0)
        return AttributeExplanation(saliency=saliency, scores=rank_scores(terms, self.phi), terms=terms,
                                    phi=self.phi, attribute_names=self.attribute_names, similarity=s.float().cpu())

    # ------------------------------------------------------------ phi
    def fit_phi(self, terms: AttributeTerms, evaluate: Callable[[Tensor], float], *,
                grid: Sequence[Sequence[float]] | None = None) -> tuple[tuple[float, ...], list[dict]]:
        """Choose phi by grid search on held-out pairs and keep it (``self.phi``).

        Args:
            terms: Eq. 4's terms of the held-out pairs (:meth:`terms`, or ``explanation.terms``).
            evaluate: ``evaluate(chosen (P,) int64) -> float``, higher is better; SANE uses the mean
                attribute deletion score of the chosen attributes
                (:func:`whymatch.metrics.attributes.attribute_insertion_deletion`).
            grid: candidate weights (default :func:`phi_grid`: three weights, or four when this SANE
                has a per-pair sensitivity term).

        Returns:
            (best phi, every candidate's {"phi", "value"}); ties keep the earlier candidate.
        """
        if not isinstance(terms, AttributeTerms):
            raise TypeError(f"terms must be AttributeTerms, got {type(terms).__name__}")
        if len(terms) == 0:
            raise ValueError("terms must hold at least one held-out pair, got 0")
        if not callable(evaluate):
            raise TypeError(f"evaluate must be callable, got {type(evaluate).__name__}")
        default = phi_grid(n=4 if self.sensitivity is not None else 3) if grid is None else grid
        candidates = [_check_phi(c) for c in default]
        if not candidates:
            raise ValueError("grid must hold at least one candidate")
        cache: dict[tuple, float] = {}
        table, best, best_v = [], None, -float("inf")
        for phi in candidates:
            chosen = rank_scores(terms, phi).argmax(1)
            key = tuple(chosen.tolist())
            if key not in cache:
                cache[key] = float(evaluate(chosen))
            v = cache[key]
            table.append({"phi": phi, "value": v})
            if v > best_v:
                best, best_v = phi, v
        if best is None:
            raise ValueError("evaluate returned NaN for every candidate phi")
        self.phi = best
        return best, table


def _relative(confidence: Tensor) -> Tensor:
    """a / max_k a_k per row (0 where a row is all zeros)."""
    mx = confidence.amax(1, keepdim=True)
    return torch.where(mx > 0, confidence / mx.clamp_min(1e-30), torch.zeros_like(confidence))
