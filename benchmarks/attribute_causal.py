"""SANE's attribute explanations scored against CAUSAL ground truth on counterfactual ShapesWorld.

Ground truth. For a positive pair (query q, reference r of the same class), every attribute of
every object of q is changed alone (``ShapesWorld.counterfactual``: same layout, same noise)
to each of its alternative values; the drop in similarity s(q, r) - s(q', r), averaged over the
alternatives, is the model's real reliance on that attribute
(``whymatch.metrics.attributes.causal_attribute_effects``; an attribute name held by several
objects takes the largest). Metrics of an explanation that names one attribute per pair:
- top1_causal: it is the attribute whose change drops the similarity most;
- causal_deletion: the drop when it alone is changed (similarity units; higher is better);
- top1_shared: it is an attribute the two KEY objects share (the old ground truth);
- swap_deletion / swap_insertion: the paper's image-swap attribute deletion and insertion (secondary
  columns; the layout of SANE's Table 2, which benchmarks/attribute_table.py used to write).

Protocol (nothing is tuned on test):
- The shipped ShapesWorld similarity model is explained.
- Attribute models are trained on images of 48 of the 60 training classes; the other 12
  training classes are VALIDATION classes: their pairs tune the attribute-model settings
  (localization weight mu, saliency-matching weight lambda and temperature), the per-pair
  sensitivity's settings (neighbours k, gate) and choose phi. Test pairs come from the 60
  unseen test classes and are scored once.
- Attribute model (SANE's head on a conv trunk): the trunk is the similarity model's own
  ShapesCNN trunk, frozen (pretrained, as SANE's ImageNet ResNet-50 is); the 3x3 head is
  trained with SANE's loss on cached trunk features, 3 seeds. The plain model (the classifier
  and "sane_no_matching" rows) has image-level labels (the union over all objects, what a data set
  without per-object labels gets); the SANE models have key-object labels and the per-object
  localization term towards the key object's mask (``labels='key'``) plus saliency matching (lambda).
- Per-pair sensitivity (the fourth term, ``whymatch.attributes.tcav.PairSensitivity``): removal
  directions from counterfactual renders of training-class images (``--n-cf`` images of the 48
  fit classes, every object, every alternative value): local (the k nearest training images,
  "sane_cf_local"), global ("sane_cf_global"), or TCAV's label-fitted CAVs on key-object labels
  ("sane_cav", what a data set without counterfactuals gets), gated by the attribute model's
  confidence. "sane" is the one of the three with the best validation score.
- Saliency: SimilarityAttention (gradient attention, one backward pass per pair) by default:
  RISE at SANE's 2000 masks per pair does not fit the time budget on 2 shared cores
  (``--saliency rise --n-masks N`` switches). Maps are divided by their maximum before the
  softmax (temperature in those units).
- phi (Eq. 4 weights, four with the sensitivity) is chosen on the validation pairs by the causal
  criterion (top1_causal, ties broken by causal deletion); the phi that the paper's criterion
  (image-swap deletion on the same validation pairs) chooses is reported beside it.

Bounds (a section of their own: rows that are NOT methods, told which object is the key object; computed from
the cached causal truth and ``object_attributes``' key-object row, no training): (a) the key object's attribute
of the best FIXED order of kinds (size / colour / shape / pattern), the order chosen on the validation pairs:
the best any per-kind prior can do; (b) SANE's own per-attribute scores restricted to the key object's four
attributes: what the choice among them costs; the ceiling (the causal top among the key object's attributes);
(c) the fraction of pairs whose runner-up drop is within 10% of the top drop (the truth is nearly a tie).

Expensive, deterministic steps (causal ground truth of the validation and test pairs, the
counterfactual renders of the training images, trunk features) are cached under ``--cache-dir``
(default ``benchmarks/.work/attribute_causal``), keyed by their settings and the similarity model's
weights, so a rerun skips them.

Usage::

    python benchmarks/attribute_causal.py          # writes benchmarks/results/attribute_causal.{json,md}
    python benchmarks/attribute_causal.py --quick --out /tmp/attr_causal
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common as C  # noqa: E402
from whymatch.attributes import AttributeLoss, build_attribute_model  # noqa: E402
from whymatch.attributes.explain import SANE, phi_grid, rank_scores  # noqa: E402
from whymatch.attributes.model import AttributeOutput, attribute_model_state  # noqa: E402
from whymatch.attributes.tcav import TCAV, PairSensitivity  # noqa: E402
from whymatch.data import ShapesWorld  # noqa: E402
from whymatch.io import atomic_torch_save  # noqa: E402
from whymatch.data.shapesworld import ATTRIBUTE_NAMES, TRAIN_CLASSES  # noqa: E402
from whymatch.metrics.attributes import (  # noqa: E402
    attribute_insertion_deletion,
    causal_attribute_deletion,
    causal_attribute_effects,
    causal_top1,
    mean_average_precision,
)
from whymatch.models import load_default_model  # noqa: E402

A = len(ATTRIBUTE_NAMES)
KINDS = ("shape", "colour", "pattern", "size")
#: ridge weights tried for the learned reliance bound (chosen on validation)
RIDGE_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
VAL_CLASSES = tuple(TRAIN_CLASSES[i] for i in range(0, len(TRAIN_CLASSES), 5))          # 12 classes
FIT_CLASSES = tuple(c for c in TRAIN_CLASSES if c not in VAL_CLASSES)                    # 48 classes
ROWS = {
    "random": "random attribute",
    "tcav": "TCAV alone",
    "attribute_classifier": "attribute classifier (image-level labels, no matching)",
    "sane_no_matching": "SANE Eq. 4 w/o map matching (plain model, a + cos + TCAV)",
    "sane_eq4": "SANE Eq. 4 (key-object model, a + cos + TCAV; phi by the causal criterion)",
    "sane_eq4_paper_phi": "SANE Eq. 4, phi by the paper's criterion (image-swap deletion)",
    "sane_eq4_no_tcav": "SANE Eq. 4 w/o TCAV (key-object model, a + cos; phi3 = 0)",
    "sensitivity_alone": "per-pair sensitivity alone (the chosen directions, gated)",
    "sane_cav": "SANE + per-pair sensitivity along label-fitted CAVs (key-object labels)",
    "sane_cf_global": "SANE + per-pair sensitivity, global counterfactual CAVs",
    "sane_cf_local": "SANE + per-pair sensitivity, local counterfactual directions",
    "sane": "SANE + per-pair sensitivity, directions chosen on validation (the default)",
    "sane_paper_phi": "SANE + per-pair sensitivity (chosen directions), phi by the paper's criterion",
}
VARIANT_ROWS = {"cav": "sane_cav", "global": "sane_cf_global", "local": "sane_cf_local"}
PHI4_VALUES = (0.0, 0.25, 1.0, 4.0, 16.0)


# ------------------------------------------------------------------ cache
class Cache:
    """torch.save files under a folder, named by a step and a hash of everything the step depends on."""

    def __init__(self, root: Path | None, fingerprint: str) -> None:
        self.root, self.fingerprint = root, fingerprint
        self.hits: list[str] = []

    def get(self, name: str, params: dict, fn):
        if self.root is None:
            return fn()
        key = hashlib.sha1(json.dumps([self.fingerprint, params], sort_keys=True, default=str).encode()).hexdigest()
        path = self.root / f"{name}-{key[:16]}.pt"
        if path.is_file():
            self.hits.append(name)
            return torch.load(path, weights_only=True)
        out = fn()
        atomic_torch_save(out, path)
        return out


def model_fingerprint(sim) -> str:
    h = hashlib.sha1()
    for k, v in sorted(sim.embedder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def counterfactual_bank(sim, ds, n: int) -> dict:
    """Every object's every attribute changed to each alternative in the first n images of ``ds``:
    embeddings (n, D), changed (M, D), source (M,), attribute (M,) (the attribute the render removed),
    key (M,) bool (the key object was changed)."""
    emb, changed, source, attribute, key = [], [], [], [], []
    with torch.no_grad():
        for i in range(n):
            smp = ds.sample(i)
            images = [smp.image]
            for k, o in enumerate(smp.objects):
                for kind in KINDS:
                    j = ATTRIBUTE_NAMES.index(f"{kind}:{getattr(o, kind)}")
                    for v in ds.alternatives(i, k, kind):
                        images.append(ds.counterfactual(i, k, kind, v).image)
                        source.append(i)
                        attribute.append(j)
                        key.append(k == 0)
            e = sim.embed(torch.stack(images), 256).float().cpu()
            emb.append(e[0])
            changed.append(e[1:])
    return {"embeddings": torch.stack(emb), "changed": torch.cat(changed), "source": torch.tensor(source),
            "attribute": torch.tensor(attribute), "key": torch.tensor(key)}


def bank_rows(bank: dict) -> torch.Tensor:
    """Which renders make the removal directions: an attribute of the key object is removed by changing
    the key object (the object a match relies on); an attribute only distractors have, by changing them."""
    n = bank["embeddings"].shape[0]
    on_key = torch.zeros(n, A, dtype=torch.bool)
    on_key[bank["source"][bank["key"]], bank["attribute"][bank["key"]]] = True
    return bank["key"] | ~on_key[bank["source"], bank["attribute"]]


def sensitivity_from_bank(sim, bank: dict, k):
    keep = bank_rows(bank)
    return PairSensitivity.from_counterfactuals(bank["embeddings"], bank["changed"][keep], bank["source"][keep],
                                                bank["attribute"][keep], A, k=k, similarity=sim)
# ------------------------------------------------------------------ pieces
def attribute_model_from_similarity(sim):
    """A 'shapes' AttributeModel whose trunk is the similarity model's ShapesCNN trunk, frozen."""
    model = build_attribute_model("shapes", A, attribute_names=ATTRIBUTE_NAMES)
    state = {k: v for k, v in sim.embedder.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = model.trunk.net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise RuntimeError(f"trunk weights do not fit: missing {missing}, unexpected {unexpected}")
    for p in model.trunk.parameters():
        p.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def trunk_features(model, images: torch.Tensor, bs: int = 256) -> torch.Tensor:
    return torch.cat([model.trunk(images[i:i + bs]) for i in range(0, len(images), bs)])


def train_head(model, feats, labels, *, masks, saliency, lam, mu, temperature, seed, epochs, batch_size=64,
               lr=5e-3):
    """Train the 3x3 head (SANE's loss: Huber + lam * matching + mu * localization) on cached features;
    returns a copy of the conv weights."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(model.channels, A, 3, padding=1, bias=False)
    loss_fn = AttributeLoss(lam, "softmax", temperature=temperature, mu=mu)
    opt = torch.optim.Adam(conv.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.985 ** e)
    g = torch.Generator().manual_seed(seed + 1)
    n = feats.shape[0]
    for _ in range(epochs):
        for b in torch.randperm(n, generator=g).split(batch_size):
            maps = conv(feats[b])
            logits = maps.mean(dim=(2, 3))
            out = AttributeOutput(maps, logits, F.softmax(logits, dim=1))
            sal = saliency[b][:, None] if (saliency is not None and lam > 0) else None
            am = masks[b].float() if (masks is not None and mu > 0) else None
            parts = loss_fn(out, labels[b], sal, None, am)
            opt.zero_grad(set_to_none=True)
            parts["total"].backward()
            opt.step()
        sched.step()
    return conv.weight.detach().clone()


def with_head(model, weight):
    model.conv.weight.data.copy_(weight)
    return model


def saliency_maps(explainer, queries, refs, bs: int = 64):
    """One map of the query per pair, divided by its maximum (a constant map stays 0)."""
    if hasattr(explainer, "attribute_tuples"):      # SimilarityAttention: a batch of pairs per pass
        maps = torch.cat([explainer.attribute_tuples(queries[i:i + bs], refs[i:i + bs])[0].float().cpu()
                          for i in range(0, len(queries), bs)])
    else:
        maps = torch.stack([explainer.attribute(q, r[None])[0].float() for q, r in zip(queries, refs)])
    mx = maps.abs().amax(dim=(1, 2), keepdim=True)
    return torch.where(mx > 0, maps / mx.clamp_min(1e-30), maps)


def causal_fit_value(chosen, effects):
    t = causal_top1(chosen, effects)
    d = causal_attribute_deletion(chosen, effects)
    return float(torch.nanmean(t)) + 0.01 * float(d.mean())


def summarize(per_seed: list[dict[str, torch.Tensor]]) -> dict:
    """Mean over seeds; standard errors over pairs (of the seed-averaged per-pair values) and over seeds."""
    out = {}
    for key in per_seed[0]:
        stack = torch.stack([s[key].float() for s in per_seed])              # (S, P)
        per_pair = torch.nanmean(stack, dim=0)
        ok = ~torch.isnan(per_pair)
        v = per_pair[ok]
        seed_means = torch.nanmean(stack, dim=1)
        out[key] = float(v.mean())
        out[f"{key}_sem"] = float(v.std() / math.sqrt(max(1, v.numel())))
        out[f"{key}_per_seed"] = [float(x) for x in seed_means]
        out[f"{key}_seed_sem"] = float(seed_means.std() / math.sqrt(len(per_seed))) if len(per_seed) > 1 else 0.0
    return out


# ------------------------------------------------------------------ bounds (rows that are not methods)
def attribute_kinds(names=ATTRIBUTE_NAMES) -> torch.Tensor:
    """(A,) int64: the position in KINDS of each attribute's kind (``kind:value`` names)."""
    return torch.tensor([KINDS.index(n.split(":")[0]) for n in names])


def restricted_choice(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(P,) int64: each pair's highest-scoring attribute among the allowed ones (a NaN score ranks below every
    number; ties keep the lowest index). scores (P, A) float, allowed (P, A) bool, one True per row at least."""
    if scores.shape != allowed.shape or scores.ndim != 2:
        raise ValueError(f"scores and allowed must both be (P, A), got {tuple(scores.shape)} and "
                         f"{tuple(allowed.shape)}")
    if allowed.dtype != torch.bool:
        raise TypeError(f"allowed must be a bool tensor, got {allowed.dtype}")
    if scores.shape[0] and not bool(allowed.any(1).all()):
        raise ValueError("allowed must hold at least one True per pair, got a pair with none")
    s = scores.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, torch.finfo(s.dtype).min), s)
    return torch.where(allowed, s, torch.full_like(s, -float("inf"))).argmax(1)


def self_drop_targets(bank: dict, n_kinds: int, kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bank image, the mean drop of its own similarity (1 - cos(e, e')) when one attribute of its key object
    changes, by kind: ((n, n_kinds) targets, (n, n_kinds) bool defined). Uses the key-object renders only."""
    e, c = bank["embeddings"].float(), bank["changed"].float()
    src, att, key = bank["source"], bank["attribute"], bank["key"]
    drop = 1.0 - F.cosine_similarity(e[src[key]], c[key], dim=1)
    n = e.shape[0]
    total, count = torch.zeros(n, n_kinds), torch.zeros(n, n_kinds)
    idx = (src[key], kinds[att[key]])
    total.index_put_(idx, drop, accumulate=True)
    count.index_put_(idx, torch.ones_like(drop), accumulate=True)
    return total / count.clamp_min(1), count > 0


def fit_reliance_ridge(x: torch.Tensor, y: torch.Tensor, defined: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge regression (one per kind, on the rows where that kind's target is defined) from features x (n, F) to
    y (n, K), with an intercept. Returns W (F + 1, K); predict with :func:`predict_reliance`."""
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    xb = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    eye = torch.eye(xb.shape[1], dtype=torch.float64)
    eye[-1, -1] = 0.0                                   # the intercept is not shrunk
    cols = []
    for k in range(y.shape[1]):
        rows = defined[:, k]
        xk = xb[rows]
        cols.append(torch.linalg.solve(xk.T @ xk + lam * eye, xk.T @ y[rows, k].double()))
    return torch.stack(cols, 1).float()


def predict_reliance(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(n, K) predicted self-drop per kind for features x (n, F) and ridge weights w (F + 1, K)."""
    return torch.cat([x.float(), torch.ones(x.shape[0], 1)], 1) @ w


def fixed_order_choice(effects: torch.Tensor, allowed: torch.Tensor, order, kinds: torch.Tensor) -> torch.Tensor:
    """(P,) int64: the allowed attribute (the key object's) of the first kind in ``order`` (indices into KINDS)
    whose change could be rendered (a defined effect: whether a counterfactual exists is a property of the
    scene, not of the model); the first kind's attribute when none could."""
    order = [int(k) for k in order]
    if sorted(order) != list(range(len(KINDS))):
        raise ValueError(f"order must be a permutation of 0..{len(KINDS) - 1}, got {order}")
    priority = torch.tensor([float(len(order) - order.index(int(k))) for k in kinds])     # (A,), higher first
    scores = priority.expand_as(effects).clone()
    scores[torch.isnan(effects)] -= len(order)                                            # below every defined one
    return restricted_choice(scores, allowed)


def best_fixed_order(effects: torch.Tensor, allowed: torch.Tensor, kinds: torch.Tensor):
    """The order of KINDS whose :func:`fixed_order_choice` scores best on these pairs (causal top-1, ties broken
    by causal deletion, then by the first in itertools.permutations order). Returns (order, value)."""
    scored = [(causal_fit_value(fixed_order_choice(effects, allowed, o, kinds), effects), o)
              for o in itertools.permutations(range(len(KINDS)))]
    value, order = max(scored, key=lambda t: t[0])      # max keeps the first of equal values
    return order, value


def causal_top1_within(chosen: torch.Tensor, effects: torch.Tensor, rel: float = 0.1) -> torch.Tensor:
    """(P,) float: 1 where the chosen attribute's drop is within ``rel`` x |top drop| of the top drop (a near-tie
    counts as a hit), 0 where not, NaN for a pair with no defined effect."""
    filled = torch.nan_to_num(effects.float(), nan=-float("inf"))
    best = filled.amax(1)
    got = filled.gather(1, chosen.long()[:, None])[:, 0]
    hit = (got >= best - rel * best.abs() - 1e-6).float()
    return torch.where(torch.isinf(best), torch.full_like(hit, float("nan")), hit)


def near_tie(effects: torch.Tensor, rel: float = 0.1) -> torch.Tensor:
    """(P,) float: 1 where the runner-up attribute's drop is within ``rel`` x |top drop| of the top drop (the
    causal truth is nearly a tie), 0 where not, NaN where fewer than two attributes have a defined effect."""
    if effects.ndim != 2 or effects.shape[1] < 2:
        raise ValueError(f"effects must be (P, A) with A >= 2, got {tuple(effects.shape)}")
    filled = torch.nan_to_num(effects.float(), nan=-float("inf"))
    top2 = filled.topk(2, dim=1).values
    hit = (top2[:, 1] >= top2[:, 0] - rel * top2[:, 0].abs() - 1e-6).float()
    defined = (~torch.isnan(effects)).sum(1) >= 2
    return torch.where(defined, hit, torch.full_like(hit, float("nan")))


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--pairs", type=int, default=300, help="scored test pairs (unseen classes)")
    ap.add_argument("--val-pairs", type=int, default=120, help="validation pairs (held-out training classes)")
    ap.add_argument("--n-test", type=int, default=600, help="test images (pairs and the image-swap database)")
    ap.add_argument("--n-val", type=int, default=400, help="validation-class images")
    ap.add_argument("--n-train", type=int, default=800, help="attribute-model training images (48 classes)")
    ap.add_argument("--n-cf", type=int, default=240,
                    help="training images whose counterfactual renders give the sensitivity's directions "
                         "(240: ~9,400 renders, the committed results)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of the attribute head")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--saliency", choices=("attention", "rise"), default="attention")
    ap.add_argument("--n-masks", type=int, default=500, help="RISE masks per pair (--saliency rise)")
    ap.add_argument("--mu-grid", type=float, nargs="+", default=[0.3, 1.0])
    ap.add_argument("--lam-grid", type=float, nargs="+", default=[0.0, 0.05])
    ap.add_argument("--temperature-grid", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--k-grid", type=int, nargs="+", default=[5, 10, 20, 40],
                    help="neighbours of the local counterfactual directions (tuned on validation)")
    ap.add_argument("--cav-steps", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                    help="step along a label-fitted CAV, in embedding units (tuned on validation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=C.REPO / "benchmarks" / ".work" / "attribute_causal")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--stop-after-cache", action="store_true",
                    help="compute the cached steps (causal truth, counterfactual renders) and stop")
    ap.add_argument("--write-shipped", action="store_true",
                    help="write the seed-0 key-object attribute model and its Eq. 4 phi ('sane_eq4') to the package's shipped files")
    ap.add_argument("--ship-from", type=Path, default=None,
                    help="only rebuild the seed-0 key-object model with the settings and 'sane_eq4' phi of this results JSON "
                         "(written by a full run) and write the shipped files")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    ap.add_argument("--out", type=Path, default=C.RESULTS / "attribute_causal")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.val_pairs, args.n_test, args.n_val, args.n_train, args.epochs = 16, 12, 120, 96, 192, 3
        args.seeds, args.mu_grid, args.lam_grid, args.temperature_grid = 2, [1.0], [0.0, 0.5], [0.5]
        args.n_cf, args.k_grid, args.cav_steps = 24, [5], [1.0]
    torch.set_num_threads(args.threads)
    machine = C.machine_info("cpu")
    load_start = C.system_load()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def tick(name, t0):
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        print(f"[{time.perf_counter() - t_start:.0f} s] {name} done", flush=True)

    if args.ship_from is not None:
        return ship_from(args)

    # ---------------------------------------------------------------- data
    t0 = time.perf_counter()
    sim = load_default_model()
    cache = Cache(None if args.no_cache else args.cache_dir, model_fingerprint(sim))
    fit = ShapesWorld("train", args.n_train, 96, seed=args.seed + 11, classes=FIT_CLASSES)
    val = ShapesWorld("train", args.n_val, 96, seed=args.seed + 12, classes=VAL_CLASSES)
    test = ShapesWorld("test", args.n_test, 96, seed=args.seed + 13)
    dsets = {"fit": fit, "val": val, "test": test}
    pairs = {"val": val.pairs(args.val_pairs, 1, seed=args.seed), "test": test.pairs(args.pairs, 1, seed=args.seed)}

    # ---------------------------------------------------------------- cached: causal truth, counterfactual bank
    effects = {}
    for name in ("val", "test"):
        ds = dsets[name]
        q, r = pairs[name].query, pairs[name].references[:, 0]

        def truth(ds=ds, q=q, r=r):
            e = causal_attribute_effects(sim, ds, q, sim.embed(ds.images(r), 256))
            return {"effects": e.effects, "base": e.base, "n_renders": e.n_renders}

        t0c = time.perf_counter()
        effects[name] = cache.get(f"truth_{name}", {"split": ds.split, "n": len(ds), "seed": ds.seed,
                                                    "classes": list(ds.classes), "pairs": len(q),
                                                    "pair_seed": args.seed}, truth)
        tick("causal_ground_truth", t0c)
    t0c = time.perf_counter()
    tq0 = pairs["test"].query
    # the query's own counterfactual drops (1 - s(q, q')): its exact reliance, the reference ignored (bound d)
    self_truth = cache.get("truth_self_test", {"split": test.split, "n": len(test), "seed": test.seed,
                                               "pairs": len(tq0), "pair_seed": args.seed},
                           lambda: {"effects": causal_attribute_effects(sim, test, tq0,
                                                                        sim.embed(test.images(tq0), 256)).effects})
    tick("causal_ground_truth", t0c)
    t0c = time.perf_counter()
    bank = cache.get("counterfactual_bank", {"n": len(fit), "seed": fit.seed, "classes": list(fit.classes),
                                             "n_cf": args.n_cf},
                     lambda: counterfactual_bank(sim, fit, min(args.n_cf, len(fit))))
    tick("counterfactual_bank", t0c)
    if args.stop_after_cache:
        print(f"cached under {args.cache_dir} (hits: {cache.hits})")
        return 0

    imgs = {name: ds.images() for name, ds in dsets.items()}
    attrs = {name: torch.stack([ds.attributes(i, "all") for i in range(len(ds))]) for name, ds in dsets.items()}
    key_attrs = {name: torch.stack([ds.attributes(i, "key") for i in range(len(ds))]) for name, ds in dsets.items()}
    emb = {name: sim.embed(x, 256) for name, x in imgs.items()}
    base_model = attribute_model_from_similarity(sim)
    feats = {name: trunk_features(base_model, x) for name, x in imgs.items()}
    h = feats["fit"].shape[-1]
    fit_masks = torch.stack([fit.attribute_masks(i, "key", h) for i in range(len(fit))])
    tick("data_embeddings_features", t0)

    # TCAV prior: CAVs on the training images, scores on validation triplets (no test labels)
    t0 = time.perf_counter()
    tcav = TCAV(similarity=sim, hinge=False, seed=args.seed, attribute_names=ATTRIBUTE_NAMES).fit(emb["fit"],
                                                                                                  attrs["fit"])
    a, p, n = TCAV.triplets(emb["val"], val.labels, seed=args.seed, similarity=sim)
    tcav_scores = tcav.scores(emb["val"][a], emb["val"][p], emb["val"][n])
    key_cavs = TCAV(similarity=sim, hinge=False, seed=args.seed).fit(emb["fit"], key_attrs["fit"]).cavs
    tick("tcav", t0)

    # ---------------------------------------------------------------- saliency
    if args.saliency == "attention":
        from whymatch.saliency import SimilarityAttention
        explainer = SimilarityAttention(sim, "layer4")
    else:
        from whymatch.saliency import RISE
        explainer = RISE(sim, n_masks=args.n_masks, grid=8, p=0.5, batch_size=250, seed=args.seed)
    sal, truth_shared = {}, {}
    for name in ("val", "test"):
        q, r = pairs[name].query, pairs[name].references[:, 0]
        t0 = time.perf_counter()
        sal[name] = saliency_maps(explainer, imgs[name][q], imgs[name][r])
        tick("saliency_pairs", t0)
        truth_shared[name] = key_attrs[name][q] & key_attrs[name][r]
    # training saliency (for lambda): each fit image against its most similar other image of its class
    t0 = time.perf_counter()
    s_fit = sim.pairwise(emb["fit"], emb["fit"])
    same = fit.labels[:, None] == fit.labels[None, :]
    s_fit = s_fit.masked_fill(~same | torch.eye(len(fit), dtype=torch.bool), -float("inf"))
    nearest = s_fit.argmax(1)
    fit_sal = saliency_maps(explainer, imgs["fit"], imgs["fit"][nearest]) if max(args.lam_grid) > 0 else None
    tick("saliency_training", t0)

    # the paper's image-swap deletion of every (pair, attribute), once: a choice is then a lookup
    t0 = time.perf_counter()
    swap, swap_ins = {}, {}
    for name in ("val", "test"):
        q, r = pairs[name].query, pairs[name].references[:, 0]
        res = [attribute_insertion_deletion(emb[name][q], emb[name][r], torch.full((len(q),), j), attrs[name][q],
                                            emb[name], attrs[name], similarity=sim, query_index=q,
                                            reference_index=r) for j in range(A)]
        swap[name] = torch.stack([x.deletion.float() for x in res], 1)
        swap_ins[name] = torch.stack([x.insertion.float() for x in res], 1)
    tick("swap_deletion_table", t0)

    def score(name, chosen, with_swap=True):
        eff = effects[name]["effects"]
        res = {"top1_shared": truth_shared[name].gather(1, chosen[:, None])[:, 0].float(),
               "top1_causal": causal_top1(chosen, eff),
               "causal_deletion": causal_attribute_deletion(chosen, eff)}
        if with_swap:
            res["swap_deletion"] = swap[name].gather(1, chosen[:, None])[:, 0]
            res["swap_insertion"] = swap_ins[name].gather(1, chosen[:, None])[:, 0]
        return res

    # sensitivity objects (deterministic: the same for every seed)
    t0 = time.perf_counter()
    sens_local = {k: sensitivity_from_bank(sim, bank, k) for k in args.k_grid}
    sens_global = sensitivity_from_bank(sim, bank, None)
    sens_cav = {st: PairSensitivity.from_cavs(key_cavs, step=st, similarity=sim) for st in args.cav_steps}
    raw = {}        # raw (ungated) sensitivities per (variant, split): computed once
    for name in ("val", "test"):
        q, r = pairs[name].query, pairs[name].references[:, 0]
        eq, er = emb[name][q], emb[name][r]
        for k, s in sens_local.items():
            raw[("local", k, name)] = s.sensitivities(eq, er).float()
        raw[("global", None, name)] = sens_global.sensitivities(eq, er).float()
        for st, s in sens_cav.items():
            raw[("cav", st, name)] = s.sensitivities(eq, er).float()
    tick("sensitivities", t0)

    def terms_of(model, name, temperature):
        sane = SANE(sim, model, tcav_scores, saliency=explainer, temperature=temperature, saliency_scale="max")
        return sane, sane.terms(imgs[name][pairs[name].query], sal[name])

    def confidences(model, x):
        with torch.no_grad():
            return torch.cat([model(x[i:i + 256]).confidences.float() for i in range(0, len(x), 256)])

    def gated(terms, conf_ref, variant, name, gate):
        g = relative(terms.confidence)
        if gate == "pair":
            g = torch.minimum(g, relative(conf_ref))
        return type(terms)(terms.confidence, terms.map_match, terms.tcav, g * raw[variant + (name,)])

    def fit_phi(sane, terms, criterion, n_weights=3, grid=None):
        if grid is None:
            grid = phi_grid(n=3) if n_weights == 3 else phi_grid(PHI4_VALUES, n=4)
        if criterion == "causal":
            return sane.fit_phi(terms, lambda c: causal_fit_value(c, effects["val"]["effects"]), grid=grid)
        return sane.fit_phi(terms, lambda c: float(torch.nanmean(score("val", c)["swap_deletion"])), grid=grid)

    def val_value(terms, phi):
        sc = score("val", rank_scores(terms, phi).argmax(1), with_swap=False)
        return {k: float(torch.nanmean(v)) for k, v in sc.items()}

    # ---------------------------------------------------------------- tuning on validation (seed 0)
    t0 = time.perf_counter()
    tuning, sens_tuning = [], []
    heads: dict[tuple, torch.Tensor] = {}
    for mu in args.mu_grid:
        for lam in args.lam_grid:
            for temp in args.temperature_grid:
                key = (mu, lam, temp if lam > 0 else None)      # lambda 0: the temperature only enters Eq. 4
                if key not in heads:
                    heads[key] = train_head(base_model, feats["fit"], key_attrs["fit"], masks=fit_masks,
                                            saliency=fit_sal, lam=lam, mu=mu, temperature=temp, seed=args.seed,
                                            epochs=args.epochs)
                model = with_head(base_model, heads[key])
                sane, terms = terms_of(model, "val", temp)
                phi, _ = fit_phi(sane, terms, "causal")
                tuning.append({"mu": mu, "lam": lam, "temperature": temp, "phi": phi, **val_value(terms, phi)})
                print(json.dumps(tuning[-1]), flush=True)
    best = max(tuning, key=lambda t: (t["top1_causal"], t["top1_shared"]))
    # sensitivity settings (variant, k or step, gate) on the chosen model
    key = (best["mu"], best["lam"], best["temperature"] if best["lam"] > 0 else None)
    model = with_head(base_model, heads[key])
    sane, terms = terms_of(model, "val", best["temperature"])
    conf_ref = confidences(model, imgs["val"][pairs["val"].references[:, 0]])
    variants = [("local", k) for k in args.k_grid] + [("global", None)] + [("cav", st) for st in args.cav_steps]
    for variant in variants:
        for gate in ("query", "pair"):
            t4 = gated(terms, conf_ref, variant, "val", gate)
            phi, _ = fit_phi(sane, t4, "causal", 4)
            sens_tuning.append({"variant": variant[0], "param": variant[1], "gate": gate, "phi": phi,
                                **val_value(t4, phi)})
            print(json.dumps(sens_tuning[-1]), flush=True)

    def best_of(kind):
        rows = [t for t in sens_tuning if t["variant"] == kind]
        return max(rows, key=lambda t: (t["top1_causal"], t["causal_deletion"]))
    chosen_sens = {kind: best_of(kind) for kind in ("local", "global", "cav")}
    # the default ("sane"): the directions with the best validation score
    default_kind = max(chosen_sens, key=lambda kd: (chosen_sens[kd]["top1_causal"], chosen_sens[kd]["causal_deletion"]))
    tick("tuning", t0)

    # ---------------------------------------------------------------- bounds (not methods; no training)
    kinds_of = attribute_kinds()
    key_q = {name: key_attrs[name][pairs[name].query] for name in ("val", "test")}

    def bound_score(chosen):
        res = score("test", chosen, with_swap=False)
        res["top1_causal_within10"] = causal_top1_within(chosen, effects["test"]["effects"], 0.1)
        return res

    order, order_val = best_fixed_order(effects["val"]["effects"], key_q["val"], kinds_of)
    bound_seeds = {
        "oracle_key_fixed_order": [bound_score(fixed_order_choice(effects["test"]["effects"], key_q["test"],
                                                                  order, kinds_of))],
        "oracle_key_sane": [], "oracle_key_sane_eq4": [],
        "oracle_key_oracle_attribute": [bound_score(restricted_choice(effects["test"]["effects"], key_q["test"]))],
    }
    bound_seeds["oracle_key_query_self_drops"] = [bound_score(restricted_choice(self_truth["effects"],
                                                                             key_q["test"]))]
    # a learned reliance predictor (not SANE): ridge from the query's embedding and key-object labels to each
    # kind's self-drop, trained on the counterfactual bank (fit classes); its weight chosen on validation
    y_b, def_b = self_drop_targets(bank, len(KINDS), kinds_of)
    n_b = y_b.shape[0]
    x_b = torch.cat([bank["embeddings"].float(), key_attrs["fit"][:n_b].float()], 1)

    def ridge_choice(w, name):
        q = pairs[name].query
        x = torch.cat([emb[name][q].float(), key_attrs[name][q].float()], 1)
        return restricted_choice(predict_reliance(x, w)[:, kinds_of], key_q[name])
    ridge_val = []
    for lam_r in RIDGE_GRID:
        w_r = fit_reliance_ridge(x_b, y_b, def_b, lam_r)
        ridge_val.append((causal_fit_value(ridge_choice(w_r, "val"), effects["val"]["effects"]), -lam_r, w_r))
    ridge_best = max(ridge_val, key=lambda t: t[:2])
    bound_seeds["oracle_key_ridge_reliance"] = [bound_score(ridge_choice(ridge_best[2], "test"))]
    ties = {name: near_tie(effects[name]["effects"], 0.1) for name in ("val", "test")}

    # ---------------------------------------------------------------- 3 seeds, scored on test
    per_seed = {k: [] for k in ROWS}
    sane_choices: list[torch.Tensor] = []
    phis: dict[str, list] = {k: [] for k in ROWS if k.startswith("sane") or k == "sensitivity_alone"}
    maps_info: dict[str, list] = {"plain": [], "sane": []}
    shipped = None
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    tq, tr = pairs["test"].query, pairs["test"].references[:, 0]
    for s in range(args.seeds):
        seed = args.seed + s
        per_seed["random"].append(score("test", torch.randint(0, A, (args.pairs,), generator=g)))
        tcav_top = int(torch.nan_to_num(tcav_scores, -1).argmax())
        per_seed["tcav"].append(score("test", torch.full((args.pairs,), tcav_top)))
        # plain model: image-level labels, no matching, no localization
        w_plain = train_head(base_model, feats["fit"], attrs["fit"], masks=None, saliency=None, lam=0.0, mu=0.0,
                             temperature=best["temperature"], seed=seed, epochs=args.epochs)
        plain = with_head(base_model, w_plain)
        maps_info["plain"].append(mean_average_precision(confidences(plain, imgs["test"]), attrs["test"])[0])
        sane, terms_val = terms_of(plain, "val", best["temperature"])
        _, terms_test = terms_of(plain, "test", best["temperature"])
        per_seed["attribute_classifier"].append(score("test", terms_test.confidence.argmax(1)))
        phi, _ = fit_phi(sane, terms_val, "causal")
        phis["sane_no_matching"].append(phi)
        per_seed["sane_no_matching"].append(score("test", rank_scores(terms_test, phi).argmax(1)))
        # SANE: key-object localized (+ matching) model with the validation-chosen settings
        w = train_head(base_model, feats["fit"], key_attrs["fit"], masks=fit_masks, saliency=fit_sal,
                       lam=best["lam"], mu=best["mu"], temperature=best["temperature"], seed=seed,
                       epochs=args.epochs)
        model = with_head(base_model, w)
        maps_info["sane"].append(mean_average_precision(confidences(model, imgs["test"]), key_attrs["test"])[0])
        sane, terms_val = terms_of(model, "val", best["temperature"])
        _, terms_test = terms_of(model, "test", best["temperature"])
        no_tcav = [t for t in phi_grid(n=3) if t[2] == 0]
        for row, crit, grid in (("sane_eq4", "causal", None), ("sane_eq4_paper_phi", "paper", None),
                                ("sane_eq4_no_tcav", "causal", no_tcav)):
            phi, _ = fit_phi(sane, terms_val, crit, grid=grid)
            phis[row].append(phi)
            per_seed[row].append(score("test", rank_scores(terms_test, phi).argmax(1)))
            if row == "sane_eq4":
                bound_seeds["oracle_key_sane_eq4"].append(
                    bound_score(restricted_choice(rank_scores(terms_test, phi), key_attrs["test"][tq])))
            if s == 0 and row == "sane_eq4":
                shipped = (w.clone(), phi)      # the shipped files hold Eq. 4 (three weights), see write_shipped
        cref = {"val": confidences(model, imgs["val"][pairs["val"].references[:, 0]]),
                "test": confidences(model, imgs["test"][tr])}
        for row, kind, crit in (*[(r, kd, "causal") for kd, r in VARIANT_ROWS.items()],
                                ("sane", default_kind, "causal"), ("sane_paper_phi", default_kind, "paper")):
            cs = chosen_sens[kind]
            variant = (kind, cs["param"])
            tv = gated(terms_val, cref["val"], variant, "val", cs["gate"])
            tt = gated(terms_test, cref["test"], variant, "test", cs["gate"])
            phi, _ = fit_phi(sane, tv, crit, 4)
            phis[row].append(phi)
            per_seed[row].append(score("test", rank_scores(tt, phi).argmax(1)))
            if row == "sane":
                sane_choices.append(rank_scores(tt, phi).argmax(1))
                bound_seeds["oracle_key_sane"].append(
                    bound_score(restricted_choice(rank_scores(tt, phi), key_attrs["test"][tq])))
                alone = (0.0, 0.0, 0.0, 1.0)
                phis["sensitivity_alone"].append(alone)
                per_seed["sensitivity_alone"].append(score("test", rank_scores(tt, alone).argmax(1)))
    tick("train_and_score_seeds", t0)

    methods = {k: summarize(v) for k, v in per_seed.items()}
    bounds = {k: summarize(v) for k, v in bound_seeds.items()}
    bounds["oracle_key_fixed_order"].update({"order": [KINDS[k] for k in order],
                                             "val_top1_causal": float(torch.nanmean(causal_top1(
                                                 fixed_order_choice(effects["val"]["effects"], key_q["val"], order,
                                                                    kinds_of), effects["val"]["effects"])))})
    bounds["oracle_key_ridge_reliance"].update({
        "lam": -ridge_best[1], "train_images": n_b,
        "val_top1_causal_by_lam": {str(-t[1]): float(torch.nanmean(causal_top1(ridge_choice(t[2], "val"),
                                                                                  effects["val"]["effects"])))
                                   for t in ridge_val}})
    tie_test = ties["test"][~torch.isnan(ties["test"])]
    bounds["near_tie_10pct"] = {"fraction": float(tie_test.mean()),
                                "sem": float(tie_test.std() / math.sqrt(max(1, tie_test.numel()))),
                                "pairs": int(tie_test.numel()),
                                "val_fraction": float(torch.nanmean(ties["val"]))}
    sane_within = [causal_top1_within(c, effects["test"]["effects"], 0.1) for c in sane_choices]
    bounds["sane_within10"] = summarize([{"top1_causal_within10": w} for w in sane_within])
    for k, v in phis.items():
        methods[k]["phi_per_seed"] = [list(p) for p in v]
    methods["attribute_classifier"]["model_map"] = float(torch.tensor(maps_info["plain"]).mean())
    methods["sane_no_matching"]["model_map"] = methods["attribute_classifier"]["model_map"]
    for k in ROWS:
        if k.startswith("sane") and k != "sane_no_matching":
            methods[k]["model_map"] = float(torch.tensor(maps_info["sane"]).mean())
    eff = effects["test"]["effects"]
    filled = torch.nan_to_num(eff, nan=-float("inf"))
    top = torch.where(torch.isinf(filled.amax(1)), torch.full((eff.shape[0],), -1), filled.argmax(1))
    kinds = {}
    for t in top.tolist():
        kind = ATTRIBUTE_NAMES[t].split(":")[0] if t >= 0 else "none"
        kinds[kind] = kinds.get(kind, 0) + 1
    data = {
        "benchmark": "attribute_causal",
        "phi_selected_on": "validation",
        "methods": methods,
        "bounds": bounds,
        "command": " ".join(["python benchmarks/attribute_causal.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "validation_classes": list(VAL_CLASSES),
        "tuning": tuning,
        "sensitivity_tuning": sens_tuning,
        "chosen_settings": {k: best[k] for k in ("mu", "lam", "temperature")},
        "chosen_sensitivity": {k: {"param": v["param"], "gate": v["gate"]} for k, v in chosen_sens.items()},
        "default_sensitivity": default_kind,
        "causal_truth": {
            "test_pairs": int(len(top)), "renders_per_pair": effects["test"]["n_renders"] / max(1, len(top)),
            "top_is_key_attribute": float(key_attrs["test"][tq].gather(1, top.clamp(min=0)[:, None]).float().mean()),
            "top_kind_counts": kinds,
            "mean_drop_of_top": float(torch.nan_to_num(eff, nan=-1).amax(1).mean()),
            "base_similarity": float(effects["test"]["base"].mean()),
        },
        "counterfactual_bank": {"images": int(bank["embeddings"].shape[0]), "renders": int(bank["changed"].shape[0])},
        "cache_hits": cache.hits,
        "chance_top1_shared": float(truth_shared["test"].float().mean()),
        "tcav_scores": dict(zip(ATTRIBUTE_NAMES, [float(x) for x in tcav_scores])),
        "timings_s": timings,
        "total_s": time.perf_counter() - t_start,
        "machine": machine,
        "load_at_start": load_start,
        "load_at_end": C.system_load(),
    }
    C.write_results(args.out, data, markdown(data))
    if args.write_shipped and shipped is not None:
        write_shipped(with_head(base_model, shipped[0]), shipped[1], data)
    print(markdown(data))
    return 0


def relative(conf: torch.Tensor) -> torch.Tensor:
    mx = conf.amax(1, keepdim=True)
    return torch.where(mx > 0, conf / mx.clamp_min(1e-30), torch.zeros_like(conf))


def build_shipped_model(data: dict):
    """Retrain the seed-0 key-object head exactly as a full run did (same images, settings, seed) from that run's
    results JSON (``data``); returns (AttributeModel, the 'sane_eq4' phi that run chose on validation). The one
    code path behind ``--ship-from`` and scripts/train_shapesworld_attributes.py."""
    best = data["chosen_settings"]
    st = data["settings"]
    phi = tuple(data["methods"]["sane_eq4"]["phi_per_seed"][0])
    sim = load_default_model()
    fit = ShapesWorld("train", st["n_train"], 96, seed=st["seed"] + 11, classes=FIT_CLASSES)
    x = fit.images()
    attrs = torch.stack([fit.attributes(i, "key") for i in range(len(fit))])
    base_model = attribute_model_from_similarity(sim)
    feats = trunk_features(base_model, x)
    masks = torch.stack([fit.attribute_masks(i, "key", feats.shape[-1]) for i in range(len(fit))])
    fit_sal = None
    if best["lam"] > 0:
        from whymatch.saliency import SimilarityAttention
        emb = sim.embed(x, 256)
        s_fit = sim.pairwise(emb, emb)
        same = fit.labels[:, None] == fit.labels[None, :]
        s_fit = s_fit.masked_fill(~same | torch.eye(len(fit), dtype=torch.bool), -float("inf"))
        fit_sal = saliency_maps(SimilarityAttention(sim, "layer4"), x, x[s_fit.argmax(1)])
    w = train_head(base_model, feats, attrs, masks=masks, saliency=fit_sal, lam=best["lam"], mu=best["mu"],
                   temperature=best["temperature"], seed=st["seed"], epochs=st["epochs"])
    return with_head(base_model, w), phi


def ship_from(args) -> int:
    """``--ship-from JSON``: rebuild the shipped model from a full run's results and write the package's files."""
    data = json.loads(args.ship_from.read_text())
    model, phi = build_shipped_model(data)
    write_shipped(model, phi, data)
    print(f"shipped: settings {data['chosen_settings']}, phi {phi}")
    return 0


def write_shipped(model, phi, data, weights_path: Path | None = None) -> tuple[Path, Path]:
    """The seed-0 key-object attribute model and its validation-chosen Eq. 4 phi ('sane_eq4') as the shipped files:
    ``weights_path`` (default the package's shapesworld_attributes.pt) and shapesworld_sane.json beside it.
    The per-pair sensitivity term is not shipped: its directions need counterfactual renders."""
    from whymatch.attributes.model import default_attribute_weights_path
    from whymatch.io import atomic_write_text

    wpath = Path(weights_path) if weights_path is not None else default_attribute_weights_path()
    atomic_torch_save(attribute_model_state(model, source="benchmarks/attribute_causal.py (seed 0, 'sane_eq4')",
                                            settings={**data["chosen_settings"], "labels": "key"}), wpath)
    jpath = wpath.with_name("shapesworld_sane.json")
    atomic_write_text(jpath, json.dumps({
        "phi": list(phi), "temperature": data["chosen_settings"]["temperature"],
        "saliency_scale": "max",
        "source": "benchmarks/attribute_causal.py: phi chosen on validation-class pairs (held-out training "
                  "classes) by causal top-1 agreement",
        "validation_top1_causal": max(t["top1_causal"] for t in data["tuning"])}, indent=1) + "\n")
    return wpath, jpath


def _pm(r, key, nd=3):
    v = r.get(key)
    if v is None:
        return "—"
    return f"{v:.{nd}f} ± {r.get(key + '_sem', 0.0):.{nd}f}"


def bounds_markdown(data: dict) -> list[str]:
    """The bounds section: rows that are told the key object (not methods), and how often the truth is a near-tie."""
    b = data.get("bounds")
    if not b:
        return []
    fo, tie, sane = b["oracle_key_fixed_order"], b["near_tie_10pct"], data["methods"]["sane"]
    cols = ("top1_causal", "top1_causal_within10", "causal_deletion", "top1_shared")

    def row(label, r):
        return [label, *(_pm(r, c) for c in cols)]
    return [
        "## Bounds (not methods: these rows are told which object is the key object)",
        "",
        "Computed from the cached causal truth and the data set's per-object labels, no training; anything chosen "
        "is chosen on the validation pairs, the test pairs are scored once. 'Within 10%': the named attribute's "
        "drop is within 10% of the top drop (a near-tie counts as a hit).",
        "",
        C.md_table(["bound", "top-1 causal ↑", "top-1 causal within 10% ↑", "causal deletion ↑",
                    "top-1 shared"], [
            row(f"(a) oracle key object + the best fixed order of kinds ({' > '.join(fo['order'])}, chosen on "
                f"validation: val top-1 causal {fo['val_top1_causal']:.3f})", fo),
            row("(b) oracle key object + SANE's own scores ('sane', its phi per seed) among the key object's 4 "
                "attributes", b["oracle_key_sane"]),
            row("(b) oracle key object + SANE Eq. 4's scores ('sane_eq4') among the key object's 4 attributes",
                b["oracle_key_sane_eq4"]),
            *([row("(d) oracle key object + the query's own counterfactual drops (exact renders of the query, "
                   "1 - s(q, q'); the reference ignored): the query's exact own reliance, which any query-only "
                   "estimate approximates",
                   b["oracle_key_query_self_drops"])] if "oracle_key_query_self_drops" in b else []),
            *([row(f"(e) oracle key object + a learned reliance predictor (not SANE): ridge from the query's "
                   f"embedding and key-object labels to each kind's self-drop, trained on "
                   f"{b['oracle_key_ridge_reliance']['train_images']} training-class images' renders, weight "
                   f"{b['oracle_key_ridge_reliance']['lam']:g} chosen on validation",
                   b["oracle_key_ridge_reliance"])] if "oracle_key_ridge_reliance" in b else []),
            row("ceiling: oracle key object + the causal top among its 4 attributes (any key-object explanation)",
                b["oracle_key_oracle_attribute"]),
            ["for comparison: 'sane' as scored above (not told the key object)", _pm(sane, "top1_causal"),
             _pm(b["sane_within10"], "top1_causal_within10"), _pm(sane, "causal_deletion"),
             _pm(sane, "top1_shared")],
        ]),
        "",
        f"(c) Near-ties: the runner-up attribute's drop is within 10% of the top drop in {tie['fraction']:.3f} ± "
        f"{tie['sem']:.3f} of the {tie['pairs']} test pairs (validation: {tie['val_fraction']:.3f}).",
        "",
    ]


def markdown(data: dict) -> str:
    m, s = data["machine"], data["settings"]
    rows = []
    for key, label in ROWS.items():
        r = data["methods"][key]
        phi = r.get("phi_per_seed")
        rows.append([label, "—" if r.get("model_map") is None else f"{r['model_map']:.3f}",
                     _pm(r, "top1_shared"), _pm(r, "top1_causal"), _pm(r, "causal_deletion"),
                     _pm(r, "swap_deletion"), _pm(r, "swap_insertion"),
                     "" if not phi else " ".join("(" + ", ".join(f"{v:g}" for v in p) + ")" for p in phi)])
    ct = data["causal_truth"]
    best = data["chosen_settings"]
    tun = sorted(data["tuning"], key=lambda t: -t["top1_causal"])
    lines = [
        "# SANE attributes against causal ground truth (counterfactual ShapesWorld)",
        "",
        f"`{data.get('command', 'python benchmarks/attribute_causal.py')}` on {m.get('cpu_model', '?')} "
        f"({m.get('torch_threads')} threads), "
        f"torch {m.get('torch', '?')}, commit {str(m.get('git_commit'))[:10]}; {data['total_s']:.0f} s in all.",
        f"{ct['test_pairs']} scored positive pairs from the unseen test classes; phi and the attribute-model "
        f"settings chosen on {s['val_pairs']} pairs of 12 held-out training classes (phi_selected_on: "
        f"{data['phi_selected_on']}). {s['seeds']} seeds for every trained model (head of SANE's attribute "
        f"network on the similarity model's frozen ShapesCNN trunk, {s['epochs']} epochs on {s['n_train']} "
        f"images of 48 training classes; image-level labels for the classifier, key-object labels and "
        f"localization for the SANE models). Saliency: {s['saliency']}. Per-pair sensitivity directions from "
        f"{data['counterfactual_bank']['renders']} counterfactual renders of {data['counterfactual_bank']['images']} "
        f"training images. "
        "Values are means over seeds ± standard error over pairs (per-seed values in the JSON).",
        "",
        C.md_table(["method", "model mAP", "top-1 shared ↑", "top-1 causal ↑", "causal deletion ↑",
                    "swap deletion (paper) ↑", "swap insertion (paper) ↑", "phi per seed"], rows),
        "",
        f"Chance top-1 shared: {data['chance_top1_shared']:.3f}. Causal truth: {ct['renders_per_pair']:.0f} "
        f"counterfactual renders per pair; the causal top attribute belongs to the key object in "
        f"{ct['top_is_key_attribute']:.2f} of pairs; by kind {ct['top_kind_counts']}; its mean drop "
        f"{ct['mean_drop_of_top']:.3f} (base similarity {ct['base_similarity']:.3f}).",
        "",
        *bounds_markdown(data),
        f"Settings chosen on validation: mu (localization) {best['mu']:g}, lambda (saliency matching) "
        f"{best['lam']:g}, temperature {best['temperature']:g}. Validation grid (seed 0, phi fitted on the "
        "same validation pairs), best first:",
        "",
        C.md_table(["mu", "lambda", "temperature", "val top-1 causal", "val top-1 shared", "val causal deletion"],
                   [[f"{t['mu']:g}", f"{t['lam']:g}", f"{t['temperature']:g}", f"{t['top1_causal']:.3f}",
                     f"{t['top1_shared']:.3f}", f"{t['causal_deletion']:.3f}"] for t in tun]),
        "",
        "Per-pair sensitivity settings on validation (the chosen attribute model; phi with four weights "
        "fitted on the same validation pairs), best first:",
        "",
        C.md_table(["directions", "k / step", "gate", "phi", "val top-1 causal", "val top-1 shared",
                    "val causal deletion"],
                   [[t["variant"], "—" if t["param"] is None else f"{t['param']:g}", t["gate"],
                     "(" + ", ".join(f"{v:g}" for v in t["phi"]) + ")", f"{t['top1_causal']:.3f}",
                     f"{t['top1_shared']:.3f}", f"{t['causal_deletion']:.3f}"]
                    for t in sorted(data["sensitivity_tuning"], key=lambda t: -t["top1_causal"])]),
        "",
        f"Chosen: {data['chosen_sensitivity']}; the default (\"sane\"): {data['default_sensitivity']}. "
        f"Cached steps reused: {data['cache_hits'] or 'none'}.",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in data["timings_s"].items()) + ".",
        "",
        C.load_note(data),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
