"""The `whymatch demo` and `whymatch explain` jobs, as functions the CLI and the tests call.

Each job explains query/reference sets with one or more methods, scores the
explanations (insertion/deletion, and the pointing game where the ground truth
is known), writes an HTML report atomically and returns the summary rows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import metrics
from .saliency import registry as _registry
from .similarity import SimilarityModel

#: Every method the jobs know, in report order (black-box methods first, then the gradient methods): the
#: names of :data:`whymatch.saliency.registry.EXPLAINERS`.
METHODS = _registry.method_names()


_default = _registry.setting_default


@dataclass
class JobSettings:
    """The settings of a demo or explain job.

    Every field but ``n_steps`` is a method setting, and its default is read from
    :mod:`whymatch.saliency.registry`: the explainer's own constructor default (RISE's ``grid`` 6 and ``p``,
    the sliding window's ``window``/``stride``, LIME's ``n_samples`` as ``lime_samples``, ...), or the
    registry's job default where the jobs deliberately differ, with its reason there (``n_masks`` 1000,
    ``batch_size`` 250, ``lime_segments`` 'slic', ``mask_iters`` 500). ``n_steps``: insertion/deletion steps
    of the scoring.
    """

    n_masks: int = _default("n_masks")
    grid: int = _default("grid")
    p: float = _default("p")
    batch_size: int = _default("batch_size")
    window: int | None = _default("window")
    stride: int | None = _default("stride")
    fixed_reference: bool = _default("fixed_reference")
    seed: int = _default("seed")
    n_steps: int = 50
    show_progress: bool = _default("show_progress")
    lime_samples: int = _default("lime_samples")
    lime_segments: str = _default("lime_segments")
    mask_iters: int = _default("mask_iters")
    target_layer: str | None = _default("target_layer")


def make_explainer(method: str, sim: SimilarityModel, s: JobSettings):
    """The explainer for ``method`` configured from the job settings (all have ``attribute(query, refs)``).

    Built by :mod:`whymatch.saliency.registry`: each method takes the settings its spec lists; a setting
    left None gives the explainer's own default."""
    return _registry.build(method, sim, s)


@dataclass
class ExplainedSet:
    """One query explained against its references by every method."""

    name: str
    query: Tensor                      # (C, H, W)
    references: Tensor                 # (K, C, Hr, Wr)
    maps: dict[str, Tensor]            # method -> (K, H, W)
    seconds: dict[str, float]          # method -> wall time for all K references
    similarity: Tensor                 # (K,) similarity of the unperturbed pair
    key_mask: Tensor | None = None     # (H, W) bool, ground truth when known
    pair_metrics: dict[str, list[dict]] = field(default_factory=dict)  # method -> per-reference metrics
    similarity_kind: str | None = None  # 'cosine', 'dot', 'neg_l2' or None (a callable): the report's colour scale


def explain_sets(sim: SimilarityModel, sets: Sequence[tuple[str, Tensor, Tensor, Tensor | None]],
                 methods: Sequence[str], settings: JobSettings,
                 log: Callable[[str], None] = lambda _m: None, *,
                 estimate: JobEstimate | None = None, timings: dict[str, float] | None = None) -> list[ExplainedSet]:
    """Explain each (name, query, references, key_mask) with every method, then score every map.

    With ``estimate`` (:func:`estimate_job`): one progress bar over the whole job, counted in the estimated
    seconds of each (query, method) step and of the scoring, so that its ETA corrects itself with the
    measured rate. ``timings``, a dict, receives the wall seconds of each phase: 'checks', each method
    (all queries) and 'scoring'.
    """
    timings = {} if timings is None else timings
    t_checks = time.perf_counter()
    explainers = {m: make_explainer(m, sim, settings) for m in methods}
    bar = _job_bar(estimate, len(sets))
    out = []
    try:
        # cheap checks of every (set, method) first, so that a bad input, target layer or model fails in
        # seconds, not after minutes of the other methods' work
        if bar is not None:
            bar.set_postfix_str("checks")
        with _one_thread():
            for name, query, refs, _ in sets:
                for m, ex in explainers.items():
                    try:
                        ex.check(query, refs)
                    except ValueError as e:
                        raise ValueError(f"{m} on {name}: {e}") from e
        timings["checks"] = time.perf_counter() - t_checks
        if bar is not None:
            bar.update(estimate.checks)
        for name, query, refs, key_mask in sets:
            maps, secs = {}, {}
            for m, ex in explainers.items():
                if bar is not None:
                    bar.set_postfix_str(f"{name[:24]}: {m}")
                t0 = time.perf_counter()
                maps[m] = ex.attribute(query, refs)
                secs[m] = time.perf_counter() - t0
                timings[m] = timings.get(m, 0.0) + secs[m]
                if bar is not None:
                    bar.update(estimate.per_method[m])
            e_q, e_r = sim.embed(query[None]), sim.embed(refs)
            kind = sim.similarity_fn if isinstance(sim.similarity_fn, str) else None
            out.append(ExplainedSet(name, query, refs, maps, secs, sim.pairwise(e_q, e_r)[0], key_mask,
                                    similarity_kind=kind))
            log(f"  {name}: " + ", ".join(f"{m} {secs[m]:.2f}s" for m in methods))
        if bar is not None:
            bar.set_postfix_str("scoring (insertion/deletion)")
        t_score = time.perf_counter()
        _score(sim, out, methods, settings)
        timings["scoring"] = time.perf_counter() - t_score
        if bar is not None:
            bar.update(estimate.scoring * len(sets))
    finally:
        if bar is not None:
            bar.close()
    return out


@contextlib.contextmanager
def _one_thread():
    """Torch's intra-op threads set to 1 inside the block, restored after (the checks' passes of 1-4 images).

    On a shared CPU, an op split over 2 threads waits at its end for the slower one; when the other process
    holds that core, every op of a small batch waits a time slice: the checks of `whymatch explain` took
    39 s against 34 s for RISE's 500 masks at a load of 4-7 on 2 cores, and 0.3 s instead of 2.2 s per
    method with one thread (2026-12-03). A pass of a few images gains little from a second thread anyway.
    """
    n = torch.get_num_threads()
    if n <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------ fast defaults, estimates, progress (issue 15)
#: What `whymatch demo` runs unless --method says otherwise: the methods that finish in seconds on a CPU
#: (RISE and the sliding window point at the key object best; the gradient methods cost one pass).
#: LIME and Mask (500 optimization steps per pair) stay available with --method all or by name.
DEMO_METHODS = ("rise", "sliding", "attention", "gradcam")
#: `whymatch explain` on a CPU: RISE with fewer masks and the two gradient methods.
CPU_EXPLAIN_METHODS = ("rise", "attention", "gradcam")
#: settings `whymatch explain` takes on a CPU unless given: (option, JobSettings field, value)
CPU_EXPLAIN_SETTINGS = (("--n-masks", "n_masks", 500), ("--batch-size", "batch_size", 50))
#: insertion/deletion steps of the scoring on a CPU (each step is 2 K forward passes per method)
CPU_SCORE_STEPS = 20


def default_methods(command: str, device: torch.device | str) -> tuple[str, ...]:
    """The method set a command runs when --method is not given: all methods on CUDA; on a CPU the fast set
    (``DEMO_METHODS`` for the demo, ``CPU_EXPLAIN_METHODS`` for explain)."""
    if torch.device(device).type == "cuda":
        return METHODS
    return DEMO_METHODS if command == "demo" else CPU_EXPLAIN_METHODS


@dataclass
class JobEstimate:
    """Seconds a job is expected to take, from one timed forward batch.

    Attributes:
        per_image: seconds per image of one forward pass (measured on a batch).
        per_method: method -> estimated seconds for one query against its K references.
        scoring: estimated seconds of the insertion/deletion scoring of one query (all methods).
        n_queries: queries in the job.
        checks: estimated seconds of the cheap checks before the work (one forward pass of each query and its
            references per method, a forward and backward pass of one image per gradient method).
    """

    per_image: float
    per_method: dict[str, float]
    scoring: float
    n_queries: int
    checks: float = 0.0

    @property
    def total(self) -> float:
        return (sum(self.per_method.values()) + self.scoring) * self.n_queries + self.checks

    def describe(self) -> str:
        parts = ", ".join(f"{m} ~{_secs(v)}" for m, v in self.per_method.items())
        return (f"estimated time: {_secs(self.total)} for {self.n_queries} quer{'y' if self.n_queries == 1 else 'ies'} "
                f"(checks ~{_secs(self.checks)}; per query: {parts}, scoring ~{_secs(self.scoring)}; from one "
                f"forward batch timed now: "
                f"{self.per_image * 1e3:.1f} ms per image)")


def _secs(v: float) -> str:
    return f"{v:.1f} s" if v < 100 else f"{v / 60:.1f} min"


def forward_cost(sim: SimilarityModel, image: Tensor, batch: int = 16) -> float:
    """Seconds per image of the model's forward pass on a batch of ``batch`` copies of ``image`` (timed after
    one untimed pass of 2 images, so that first-call costs stay out)."""
    x = image[None].expand(batch, -1, -1, -1).contiguous()
    with torch.no_grad():
        sim.embed(x[:2])
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        sim.embed(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
    return (time.perf_counter() - t0) / batch


def method_passes(method: str, sim: SimilarityModel, s: JobSettings, size: tuple[int, int], k: int) -> float:
    """Forward-pass equivalents (images) of ``method`` for one query against ``k`` references (a backward
    pass counted as two forwards)."""
    both = not s.fixed_reference
    if method == "rise":
        return s.n_masks + (k * make_explainer("rise", sim, s).n_reference_masks if both else 0) + k
    if method == "sliding":
        ex = make_explainer("sliding", sim, s)
        n = ex.boxes(size).shape[0] + k
        return n + (k * ex.boxes(size, reference=True).shape[0] if both else 0)
    if method == "lime":
        return s.lime_samples + k
    if method == "mask":
        return 3.0 * s.mask_iters * k * (2 if both else 1)
    return 3.0 * (k + 1)  # attention, gradcam: one forward + backward of the query and the references


def estimate_job(sim: SimilarityModel, query: Tensor, k: int, methods: Sequence[str], s: JobSettings,
                 n_queries: int = 1) -> JobEstimate:
    """How long ``methods`` will take for ``n_queries`` queries of K = ``k`` references like ``query``,
    from one timed forward batch (a guide: LIME's superpixels and the optimizers' own work are not counted)."""
    per = forward_cost(sim, query, max(1, min(16, s.batch_size)))
    size = tuple(query.shape[-2:])
    per_method = {m: method_passes(m, sim, s, size, k) * per for m in methods}
    scoring = len(methods) * 2 * (s.n_steps + 1) * k * per
    checks = sum((k + 1) + (3 if m in ("attention", "gradcam") else 0) for m in methods) * per * n_queries
    return JobEstimate(per, per_method, scoring, n_queries, checks)


def _job_bar(estimate: JobEstimate | None, n_sets: int):
    """One tqdm bar over a job, in estimated seconds (None without an estimate)."""
    if estimate is None:
        return None
    from tqdm.auto import tqdm

    total = (sum(estimate.per_method.values()) + estimate.scoring) * n_sets + estimate.checks
    return tqdm(total=total, desc="whymatch", dynamic_ncols=True, disable=None,  # None: on a terminal only
                bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}{postfix}]")


def _score(sim: SimilarityModel, sets: list[ExplainedSet], methods: Sequence[str], s: JobSettings) -> None:
    """Insertion/deletion AUC for every (query, reference, map), pointing game where ground truth exists."""
    for m in methods:
        queries = torch.cat([x.query[None].expand(x.references.shape[0], -1, -1, -1) for x in sets])
        maps = torch.cat([x.maps[m] for x in sets])
        same_size = all(x.references.shape[2:] == x.query.shape[1:] for x in sets)
        refs = torch.cat([x.references for x in sets]) if same_size else None
        if refs is None:  # references of another size: score each set on its own
            results = [metrics.insertion_deletion(sim, x.query[None].expand(x.references.shape[0], -1, -1, -1),
                                                  x.references, x.maps[m], mode="both", n_steps=s.n_steps,
                                                  batch_size=s.batch_size) for x in sets]
            ins = torch.cat([r.insertion.auc for r in results])
            dele = torch.cat([r.deletion.auc for r in results])
        else:
            r = metrics.insertion_deletion(sim, queries, refs, maps, mode="both", n_steps=s.n_steps,
                                           batch_size=s.batch_size)
            ins, dele = r.insertion.auc, r.deletion.auc
        i = 0
        for x in sets:
            k = x.references.shape[0]
            rows = []
            for j in range(k):
                row = {"similarity": float(x.similarity[j]), "insertion_auc": float(ins[i + j]),
                       "deletion_auc": float(dele[i + j])}
                if x.key_mask is not None:
                    km = x.key_mask[None]
                    row["pointing"] = bool(metrics.pointing_game(x.maps[m][j:j + 1], km)[0])
                    row["mass_on_key"] = float(metrics.mass_on_mask(x.maps[m][j:j + 1], km)[0])
                rows.append(row)
            x.pair_metrics[m] = rows
            i += k


def summarize(sets: Sequence[ExplainedSet], methods: Sequence[str]) -> list[dict]:
    """One row per method: mean metrics over every (query, reference) pair and seconds per query."""
    rows = []
    for m in methods:
        pm = [r for x in sets for r in x.pair_metrics[m]]
        row = {"method": m,
               "insertion_auc": sum(r["insertion_auc"] for r in pm) / len(pm),
               "deletion_auc": sum(r["deletion_auc"] for r in pm) / len(pm)}
        if all("pointing" in r for r in pm):
            row["pointing_acc"] = sum(r["pointing"] for r in pm) / len(pm)
            row["mass_on_key"] = sum(r["mass_on_key"] for r in pm) / len(pm)
        row["sec_per_query"] = sum(x.seconds[m] for x in sets) / len(sets)
        row["refs_per_query"] = sum(x.references.shape[0] for x in sets) / len(sets)
        rows.append(row)
    if sets and all(x.key_mask is not None for x in sets):
        chance = float(metrics.chance_level(torch.stack([x.key_mask for x in sets])).mean())
        rows.append({"method": "chance (key-object area)", "pointing_acc": chance, "mass_on_key": chance})
    return rows


def write(out_dir: str | Path, sets: Sequence[ExplainedSet], methods: Sequence[str], summary: list[dict],
          title: str) -> Path:
    from .viz import write_report

    pairs = []
    for x in sets:
        pairs.append({"name": x.name, "query": x.query.cpu(), "references": list(x.references.cpu()),
                      "maps": {m: v.cpu() for m, v in x.maps.items()}, "metrics": x.pair_metrics,
                      "key_mask": None if x.key_mask is None else x.key_mask.cpu(), "similarity": x.similarity.cpu()})
    # maps relative to the pair's similarity when it is a cosine (in [-1, 1]); else one scale per query and method
    scale = "similarity" if sets and all(x.similarity_kind == "cosine" for x in sets) else "shared"
    return write_report(out_dir, pairs, summary, title=title, methods=list(methods), scale=scale)


def run_demo(out_dir: str | Path, *, n_queries: int = 4, n_refs: int = 3, settings: JobSettings | None = None,
             methods: Sequence[str] = METHODS, log: Callable[[str], None] = print,
             device: str | torch.device = "cpu", progress: bool = False) -> tuple[list[dict], Path]:
    """Explain ShapesWorld test pairs with the shipped model on ``device``; returns (summary rows, index.html
    path). ``progress``: say up front how long the methods will take and show one progress bar with an ETA."""
    from .data import ShapesWorld
    from .models import load_default_model

    s = settings or JobSettings()
    dev = torch.device(device)
    sim = load_default_model(dev)
    ds = ShapesWorld("test", n_samples=600, seed=s.seed)
    pairs = ds.pairs(n_queries, n_refs, seed=s.seed)
    sets = []
    for qi, refs in zip(pairs.query.tolist(), pairs.references):
        smp = ds.sample(qi)
        ref_imgs = torch.stack([ds[int(r)][0] for r in refs])
        k = smp.key_object
        sets.append((f"test #{qi}: {k.size} {k.colour} {k.pattern} {k.shape}", smp.image.to(dev), ref_imgs.to(dev),
                     smp.key_mask.to(dev)))
    log(f"whymatch demo: {n_queries} ShapesWorld test queries x {n_refs} references on {dev}, methods "
        f"{', '.join(methods)}")
    estimate = None
    if progress:
        estimate = estimate_job(sim, sets[0][1], n_refs, methods, s, n_queries)
        log(estimate.describe())
    explained = explain_sets(sim, sets, methods, s, log, estimate=estimate)
    truth = [ds.attributes(int(q), "key")[None] & torch.stack([ds.attributes(int(r), "key") for r in refs])
             for q, refs in zip(pairs.query.tolist(), pairs.references)]
    attributed = add_attribute_explanations(sim, explained, methods, truth=truth, seed=s.seed, log=log)
    if attributed:
        add_causal_attribute_check(sim, ds, explained, pairs.query.tolist(), methods)
    summary = summarize(explained, methods)
    if attributed:
        for row in summary:
            if row["method"] in methods:
                pm = [r for x in explained for r in x.pair_metrics[row["method"]]]
                row["attribute_top1"] = sum(r["attribute_shared"] for r in pm) / len(pm)
                row["attribute_causal_top1"] = sum(r["attribute_causal"] for r in pm) / len(pm)
    index = write(out_dir, explained, methods, summary, "whymatch demo: ShapesWorld test pairs")
    return summary, index


def shapesworld_sane(sim: SimilarityModel, *, n_tcav: int = 1000, seed: int = 0):
    """SANE for the shipped ShapesWorld models: the shipped attribute model and a TCAV prior fitted on
    ``n_tcav`` train-split images (un-hinged triplet sensitivities). None when the attribute weights
    are not installed."""
    from .attributes import SANE, TCAV, load_default_attribute_model
    from .data import ShapesWorld

    try:
        model = load_default_attribute_model(sim.device)
    except FileNotFoundError:
        return None
    train = ShapesWorld("train", n_samples=n_tcav, seed=seed)
    # embedded on the model's device, fitted on the CPU (the TCAV fit is small); the scores go back to the device
    emb = sim.embed(train.images().to(sim.device), batch_size=250).cpu()
    attrs = torch.stack([train.attributes(i, "all") for i in range(len(train))])
    tcav = TCAV(similarity=sim, hinge=False, seed=seed, attribute_names=model.attribute_names).fit(emb, attrs)
    a, p, n = TCAV.triplets(emb, train.labels, seed=seed, similarity=sim)
    return SANE(sim, model, tcav.scores(emb[a], emb[p], emb[n]).to(sim.device), **shapesworld_sane_settings())


def shapesworld_sane_settings() -> dict:
    """SANE's phi (and saliency temperature) for the shipped ShapesWorld models: the weights chosen on
    validation-class pairs by ``benchmarks/attribute_causal.py`` (models/weights/shapesworld_sane.json),
    or equal weights when that file is missing."""
    import math

    from .attributes.model import default_attribute_weights_path
    from .io import FileFormatError, read_json_file

    path = default_attribute_weights_path().with_name("shapesworld_sane.json")
    if not path.is_file():
        return {"phi": (1.0, 1.0, 1.0)}
    blob = read_json_file(path, "SANE settings", required_keys=("phi",))
    try:
        phi = tuple(float(v) for v in blob["phi"])
        temperature = float(blob.get("temperature", 0.05))
    except (TypeError, ValueError):
        phi, temperature = (), math.nan
    if len(phi) != 3 or not all(math.isfinite(v) for v in (*phi, temperature)) or temperature <= 0:
        raise FileFormatError(f"SANE settings {path}: 'phi' must be 3 finite numbers and 'temperature' a "
                              f"positive number, got phi {blob['phi']!r}, temperature {blob.get('temperature')!r}")
    scale = blob.get("saliency_scale", "none")
    if scale not in ("none", "max"):
        raise FileFormatError(f"SANE settings {path}: 'saliency_scale' must be 'none' or 'max', got {scale!r}")
    return {"phi": phi, "temperature": temperature, "saliency_scale": scale}


def add_causal_attribute_check(sim: SimilarityModel, ds, sets: Sequence[ExplainedSet], queries: Sequence[int],
                               methods: Sequence[str]) -> None:
    """The causal check of SANE's attribute where ground truth exists (ShapesWorld pairs).

    Every attribute of the query's objects is changed alone (``ShapesWorld.counterfactual``) and the
    drop in similarity to each reference measured (``whymatch.metrics.attributes.causal_attribute_effects``).
    Each (pair, method) row of :func:`add_attribute_explanations` gets 'attribute_causal_top' (the
    attribute whose change drops the similarity most), 'attribute_causal' (SANE's attribute is it) and
    'attribute_drop' (the drop when SANE's attribute alone changes).
    """
    from .data.shapesworld import ATTRIBUTE_NAMES
    from .metrics.attributes import causal_attribute_effects

    for x, q in zip(sets, queries):
        k = x.references.shape[0]
        eff = causal_attribute_effects(sim, ds, torch.full((k,), int(q)), sim.embed(x.references))
        for m in methods:
            for j, row in enumerate(x.pair_metrics[m]):
                if row.get("attribute") not in ATTRIBUTE_NAMES:
                    continue
                a, top = ATTRIBUTE_NAMES.index(row["attribute"]), int(eff.top[j])
                effects = eff.effects[j]
                row["attribute_causal_top"] = ATTRIBUTE_NAMES[top] if top >= 0 else "none"
                row["attribute_causal"] = bool(top >= 0 and float(effects[a]) >= float(effects[top]) - 1e-6)
                row["attribute_drop"] = 0.0 if torch.isnan(effects[a]) else float(effects[a])


def add_attribute_explanations(sim: SimilarityModel, sets: Sequence[ExplainedSet], methods: Sequence[str], *,
                               truth: Sequence[Tensor] | None = None, seed: int = 0,
                               log: Callable[[str], None] = lambda _m: None) -> bool:
    """Put SANE's attribute explanation of every saliency map into the sets' per-pair metrics.

    For each (query, reference, method) the attribute that best explains the match under that
    method's map (Eq. 4) goes in as 'attribute', the query's own most likely attribute as
    'query_attribute', and, when ``truth`` ((K, A) bool per set: the attributes the two key objects
    share) is given, whether the chosen attribute is one of them as 'attribute_shared'.

    Returns:
        False (and changes nothing) when the shipped attribute model is not installed.
    """
    sane = shapesworld_sane(sim, seed=seed)
    if sane is None:
        log("  (no attribute model installed: attribute explanations skipped)")
        return False
    names = sane.attribute_names
    for si, x in enumerate(sets):
        k = x.references.shape[0]
        queries = x.query[None].expand(k, -1, -1, -1)
        for m in methods:
            ex = sane.explain_pairs(queries, x.references, saliency=x.maps[m])
            for j, row in enumerate(x.pair_metrics[m]):
                top = int(ex.top_attribute[j])
                row["attribute"] = names[top]
                row["attribute_terms"] = (f"{names[top]} = {ex.phi[0]:g} x a {float(ex.terms.confidence[j, top]):.2f}"
                                          f" + {ex.phi[1]:g} x cos {float(ex.terms.map_match[j, top]):.2f}"
                                          f" + {ex.phi[2]:g} x TCAV {float(ex.terms.tcav[j, top]):.2f}")
                row["query_attribute"] = names[int(ex.query_attribute[j])]
                if truth is not None:
                    row["attribute_shared"] = bool(truth[si][j, top])
    return True


# ------------------------------------------------------------------ AVSL
_AVSL_WEIGHTS = {"model": "model.pt", "best": "best.pt", "checkpoint": "checkpoint.pt"}


def load_avsl_run(run_dir: str | Path, weights: str = "model", device: str | torch.device | None = None):
    """The AVSL model a ``whymatch train avsl --out RUN_DIR`` run wrote, in eval mode, and its image size.

    The architecture comes from RUN_DIR/config.json (backbone, nodes per level, link k, momentum,
    gamma, reliability, image size); the weights from RUN_DIR/model.pt (``weights='model'``, written
    when training ends), best.pt (the epoch with the best Recall@1) or checkpoint.pt (the last
    epoch). Edges are part of the weights. Returns (whymatch.avsl.AVSL, image size).

    Every file is read as data (JSON, and ``torch.load(weights_only=True)``: never code) and checked
    before use: a config that is not a JSON object, lacks a key or holds a value of the wrong type,
    and weights that are refused, truncated, not a state dict, non-finite or of another architecture
    give one line naming the file and the key.

    Raises:
        FileNotFoundError: RUN_DIR/config.json or the weights file is missing.
        FileFormatError (a ValueError): a malformed file, named.
        ValueError: the run is not an AVSL run.
    """
    from .io import FileFormatError, load_torch_file, read_json_file
    from .ops import _validate as V
    from .train.avsl_task import build_avsl_model
    from .train.checkpoint import check_tensor_dict, check_tensors_match
    from .train.tasks import BACKBONES

    V.choice("weights", weights, tuple(_AVSL_WEIGHTS))
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise ValueError(f"--run {run} is a file, not a training run directory")
    cfg_path, w_path = run / "config.json", run / _AVSL_WEIGHTS[weights]
    for p in (cfg_path, w_path):
        if not p.is_file():
            hint = " (written when training ends; --weights best or checkpoint use the files saved each epoch)" \
                if weights == "model" and p == w_path else ""
            what = "a directory, not a file" if p.is_dir() else "missing"
            raise FileNotFoundError(f"not an AVSL training run: {p} is {what}{hint}")
    cfg = read_json_file(cfg_path, "AVSL run config", required_keys=("task",))
    if cfg.get("task") != "avsl":
        raise ValueError(f"{cfg_path} is a {cfg.get('task')!r} run, not 'avsl'")
    kinds = {"a string": (str,), "an int": (int,), "a number": (int, float)}
    keys = {"backbone": "a string", "embedding_dim": "an int", "topk": "an int", "momentum": "a number",
            "gamma": "a number", "reliability": "a string", "image_size": "an int"}
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise FileFormatError(f"AVSL run config {cfg_path} lacks the keys {', '.join(map(repr, missing))}")
    for k, kind in keys.items():
        v = cfg[k]
        if isinstance(v, bool) or not isinstance(v, kinds[kind]):
            raise FileFormatError(f"AVSL run config {cfg_path}: {k!r} must be {kind}, got {v!r}")
    if cfg["backbone"] not in BACKBONES:
        raise FileFormatError(f"AVSL run config {cfg_path}: 'backbone' must be one of {', '.join(BACKBONES)}, "
                              f"got {cfg['backbone']!r}")
    if not 8 <= cfg["image_size"] <= 4096:
        raise FileFormatError(f"AVSL run config {cfg_path}: 'image_size' must be in [8, 4096], got {cfg['image_size']}")
    if not 1 <= cfg["embedding_dim"] <= 65536:
        raise FileFormatError(f"AVSL run config {cfg_path}: 'embedding_dim' must be in [1, 65536], "
                              f"got {cfg['embedding_dim']}")
    try:
        sim = build_avsl_model(cfg["backbone"], cfg["embedding_dim"], topk=cfg["topk"],
                               momentum=float(cfg["momentum"]), gamma=float(cfg["gamma"]),
                               reliability=cfg["reliability"])
    except (ValueError, TypeError) as exc:
        raise FileFormatError(f"AVSL run config {cfg_path}: {exc}") from None
    what = {"model": "AVSL weights", "best": "AVSL best checkpoint", "checkpoint": "AVSL checkpoint"}[weights]
    state = load_torch_file(w_path, what, required_keys=None if weights == "model" else ("model",))
    target = sim.embedder if weights == "model" else sim
    try:
        state = check_tensor_dict("the weights", state if weights == "model" else state["model"])
        check_tensors_match("the weights", state, target.state_dict(), f"another architecture than {cfg_path} says")
        target.load_state_dict(state)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise FileFormatError(f"{what} {w_path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None
    avsl = sim.embedder.to(device or "cpu").eval()
    return avsl, cfg["image_size"]


def run_avsl_explain(run_dir: str | Path, query: str | Path, references: Sequence[str | Path], out_dir: str | Path,
                     *, top: int = 5, by: str = "lambda", weights: str = "model", size: int | None = None,
                     device: str | torch.device | None = None) -> tuple[list[dict], Path]:
    """Explain a query against each reference with a trained AVSL model (AVSL Eq. 11) and write the report.

    Every image is read before anything is written. Returns (one row per reference: its name,
    the overall distance and each level's top node with its lambda, index.html path).
    """
    from .io import load_image
    from .viz import write_avsl_report

    avsl, trained_size = load_avsl_run(run_dir, weights, device)
    s = size or trained_size
    dev = next(avsl.parameters()).device
    q = load_image(query, size=(s, s)).to(dev)
    refs = [load_image(r, size=(s, s)).to(dev) for r in references]
    pairs, rows = [], []
    for path, r in zip(references, refs):
        ex = avsl.explain(q, r, top=top, by=by)
        name = f"{Path(query).name} vs {Path(path).name}"
        pairs.append({"name": name, "x1": q.cpu(), "x2": r.cpu(), "explanation": ex})
        row = {"reference": Path(path).name, "distance": float(ex.distance)}
        for li, lv in enumerate(ex.levels):
            row[f"level{li}_top_node"] = int(lv.nodes[0])
            row[f"level{li}_lambda"] = float(lv.lambdas[0])
        rows.append(row)
    index = write_avsl_report(out_dir, pairs, title=f"whymatch AVSL explanation: {Path(query).name}")
    return rows, index
