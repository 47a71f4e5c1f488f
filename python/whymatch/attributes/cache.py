"""Bulk RISE saliency maps for training SANE's attribute model, memory-mapped on disk.

SANE (Plummer et al., ECCV 2020, section 3.2) supervises the attribute maps with the
saliency maps of each training image's matches with its most similar images (Eq. 2).
Those maps cost N forward passes each, so they are computed once, stored as a float16
array on disk and reused across epochs and runs:

    path/manifest.json     fingerprint + shapes; written last (its presence = a finished build)
    path/maps.npy          (N, K, s, s) float16, RISE maps of image i against its K references
    path/references.npy    (N, K) int64 reference indices, -1 where fewer than K exist

One RISE pass per image explains it against all of its K references at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..io import atomic_write, atomic_write_text
from ..ops import _validate as V
from ..similarity import SimilarityModel

__all__ = ["SaliencyCache", "MANIFEST"]

MANIFEST = "manifest.json"
_MAPS = "maps.npy"
_REFS = "references.npy"
_FORMAT = 1


def _image(item: object, name: str = "images") -> Tensor:
    """The image of a data set item: (image, label) or image; uint8 becomes float in [0, 1]."""
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} items must be an image (C, H, W) tensor or an (image, label) pair, got {got}")
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _tensor_bytes(t: Tensor) -> bytes:
    """dtype, shape and raw bytes of a tensor."""
    t = t.detach().cpu().contiguous()
    head = str(t.dtype).encode() + str(tuple(t.shape)).encode()
    return head + (t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _tensor_hash(t: Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()


def _describe(fn: object) -> str:
    """A similarity function by name (stable across runs: no memory address)."""
    if isinstance(fn, str):
        return fn
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _dist() -> tuple[bool, int, int]:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return on, (dist.get_rank() if on else 0), (dist.get_world_size() if on else 1)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _seed_for(seed: int, index: int) -> int:
    """Mask seed of image ``index``: distinct masks per image (shared masks would imprint one
    mask pattern on every map), stable across runs and ranks."""
    h = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFFFFFFFFFFFFFF


class SaliencyCache:
    """RISE saliency maps of every image against its K most similar images, memory-mapped.

    Build with :meth:`build` (reuses a finished cache whose fingerprint matches), open with
    :meth:`open`. ``cache[i]`` is (maps (K, s, s) float32, valid (K,) bool); ``cache.maps`` the
    whole (N, K, s, s) float16 array (a read-only ``np.memmap``), ``cache.references`` the
    (N, K) int64 reference indices (-1 = none, its map is zeros).

    A cache pickles by path (DataLoader workers reopen the memory map).
    """

    def __init__(self, path: str | os.PathLike, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._maps: np.memmap | None = None
        self.references = torch.from_numpy(np.load(self.path / _REFS)).long()
        n, k, s = manifest["n"], manifest["k"], manifest["size"]
        if tuple(self.references.shape) != (n, k):
            raise ValueError(f"{self.path / _REFS} has shape {tuple(self.references.shape)}, the manifest ({n}, {k})")
        if tuple(self.maps.shape) != (n, k, s, s):
            raise ValueError(f"{self.path / _MAPS} has shape {tuple(self.maps.shape)}, "
                             f"the manifest ({n}, {k}, {s}, {s})")

    # ---------------------------------------------------------------- access
    @property
    def maps(self) -> np.memmap:
        """(N, K, s, s) float16 read-only memory map."""
        if self._maps is None:
            self._maps = np.load(self.path / _MAPS, mmap_mode="r")
        return self._maps

    @property
    def valid(self) -> Tensor:
        """(N, K) bool: which maps exist."""
        return self.references >= 0

    @property
    def fingerprint(self) -> dict:
        return self.manifest["fingerprint"]

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    def __len__(self) -> int:
        return int(self.manifest["n"])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """(maps (K, s, s) float32, valid (K,) bool) of image ``index``."""
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index must be in [-{len(self)}, {len(self)}), got {index}")
        return torch.from_numpy(np.array(self.maps[i], dtype=np.float32)), self.references[i] >= 0

    def batch(self, indices: Tensor | list[int]) -> tuple[Tensor, Tensor]:
        """(maps (B, K, s, s) float32, valid (B, K) bool) of several images, in the given order."""
        idx = torch.as_tensor(indices, dtype=torch.long).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"indices must be in [0, {len(self)}), got values in [{int(idx.min())}, {int(idx.max())}]")
        arr = idx.numpy()
        order = np.argsort(arr, kind="stable")            # sequential reads from the map
        out = np.empty((len(arr), *self.maps.shape[1:]), dtype=np.float32)
        out[order] = self.maps[arr[order]]
        return torch.from_numpy(out), self.references[idx] >= 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def __repr__(self) -> str:
        return f"SaliencyCache({str(self.path)!r}, n={len(self)}, k={self.k}, size={self.size})"

    # ---------------------------------------------------------------- open / build
    @classmethod
    def open(cls, path: str | os.PathLike) -> SaliencyCache:
        """Open a finished cache (its manifest exists); FileNotFoundError names what is missing."""
        p = Path(path)
        man = p / MANIFEST
        if not man.is_file():
            raise FileNotFoundError(f"no finished saliency cache at {p}: {man} is missing "
                                    "(build one with SaliencyCache.build)")
        manifest = json.loads(man.read_text())
        if manifest.get("format") != _FORMAT:
            raise ValueError(f"{man} has format {manifest.get('format')!r}, expected {_FORMAT}")
        for f in (_MAPS, _REFS):
            if not (p / f).is_file():
                raise FileNotFoundError(f"saliency cache at {p} is incomplete: {p / f} is missing")
        return cls(p, manifest)

    @staticmethod
    def fingerprint_of(sim: SimilarityModel, images: Dataset, *, k: int, labels: Tensor | None, size: int,
                       n_masks: int, grid: int, p: float, seed: int) -> dict:
        """What a cache's content depends on (JSON-able). Images are not hashed in full: the
        data set's length, its image shape and a hash of three images (first, middle, last) stand in."""
        n = len(images)
        probe = sorted({0, n // 2, n - 1})
        img_hash = hashlib.sha256("".join(_tensor_hash(_image(images[i])) for i in probe).encode()).hexdigest()
        return {
            "model_sha256": _weights_hash(sim),
            "similarity": _describe(sim.similarity_fn),
            "n_images": n,
            "image_shape": list(_image(images[0]).shape),
            "images_sha256": img_hash,
            "labels_sha256": None if labels is None else _tensor_hash(labels.long()),
            "rise": {"n_masks": n_masks, "grid": grid, "p": p, "seed": seed, "normalize": "rise", "baseline": 0.0},
            "k": k,
            "size": size,
        }

    @classmethod
    def build(cls, sim: SimilarityModel, images: Dataset, path: str | os.PathLike, *, k: int = 5,
              labels: Tensor | None = None, size: int | None = None, n_masks: int = 500, grid: int = 8,
              p: float = 0.5, batch_size: int = 250, seed: int = 0, show_progress: bool = False) -> SaliencyCache:
        """Compute (or reuse) the RISE maps of every image against its K most similar images.

        References of image i: the K images j != i with the highest ``sim`` similarity of
        embeddings, among the images with i's label when ``labels`` is given, else among all
        images; fewer than K candidates leave -1 entries (invalid maps). Image i's maps are one
        :meth:`whymatch.saliency.RISE.attribute` call (query i, the K reference embeddings),
        normalize 'rise' (similarity units), baseline 0, masks seeded from (seed, i), resized
        to ``size`` with adaptive average pooling (bilinear when enlarging).

        Reuse and crash safety: when path/manifest.json exists and its fingerprint
        (:meth:`fingerprint_of`) equals this call's, the cache is opened as it is (no RISE call).
        Otherwise the manifest is removed first, maps are written into a temporary file,
        renamed into place when complete, and the manifest is written last (atomically), so an
        interrupted build leaves no manifest and the next call rebuilds.

        Under torch.distributed every rank must call this with the same arguments: rank r
        computes rows r, r + world, ... into the shared file (the path must be on a file
        system all ranks see), then rank 0 finishes it after a barrier.

        Args:
            sim: the similarity model explained (on its device; images are moved there).
            images: a Dataset of N images (C, H, W) in [0, 1] (float or uint8), or
                (image, label) items; all of one size.
            path: the cache directory (created).
            k: K, references (maps) per image.
            labels: optional (N,) int labels restricting references to the same label.
            size: s, side of the stored maps (default the image height; maps are square).
            n_masks, grid, p, batch_size: RISE settings (see :class:`whymatch.saliency.RISE`).
            seed: seed of the masks.
            show_progress: tqdm bar over images (rank 0).

        Returns:
            The opened :class:`SaliencyCache`.
        """
        from ..saliency import RISE

        if not isinstance(sim, SimilarityModel):
            raise TypeError(f"sim must be a whymatch.SimilarityModel, got {type(sim).__name__}")
        if not isinstance(images, Dataset) and not hasattr(images, "__getitem__"):
            raise TypeError(f"images must be a Dataset of images or (image, label) items, got {type(images).__name__}")
        n = len(images)
        if n == 0:
            raise ValueError("images must not be empty")
        k = V.positive_int("k", k)
        if labels is not None:
            labels = V.tensor("labels", torch.as_tensor(labels), ndim=1)
            if labels.is_floating_point():
                raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
            if labels.shape[0] != n:
                raise ValueError(f"labels must have one entry per image ({n}), got {labels.shape[0]}")
            labels = labels.cpu().long()
        first = _image(images[0])
        c, h, w = first.shape
        if h != w:
            raise ValueError(f"images must be square (maps are stored s x s), got {h} x {w}")
        size = h if size is None else V.positive_int("size", size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        rise = RISE(sim, n_masks=n_masks, grid=grid, p=p, batch_size=batch_size, seed=seed)  # validates
        out = Path(path)
        fp = cls.fingerprint_of(sim, images, k=k, labels=labels, size=size, n_masks=n_masks, grid=grid,
                                p=float(p), seed=seed)
        distributed, rank, world = _dist()

        existing = cls._matching(out, fp)
        reuse = existing is not None
        if distributed:  # every rank must take the same branch
            import torch.distributed as dist

            flag = torch.tensor([1 if reuse else 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            reuse = bool(flag.item())
        if reuse:
            _barrier()
            return existing if existing is not None else cls.open(out)

        _barrier()  # nobody still reads the old manifest
        dev = sim.device
        was_training = sim.training
        sim.eval()
        try:
            cls._compute(sim, rise, images, out, fp, k=k, labels=labels, size=size, batch_size=batch_size,
                         seed=seed, show_progress=show_progress, dev=dev)
        finally:
            sim.train(was_training)
        return cls.open(out)

    @classmethod
    def _compute(cls, sim, rise, images, out: Path, fp: dict, *, k: int, labels: Tensor | None, size: int,
                 batch_size: int, seed: int, show_progress: bool, dev: torch.device) -> None:
        distributed, rank, world = _dist()
        t0 = time.perf_counter()
        n = len(images)
        emb = _embed_all(sim, images, batch_size, dev)
        refs = cls._references(sim, emb, k, labels)
        tmp_maps = out / (_MAPS + ".partial")
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                (out / MANIFEST).unlink()
            arr = np.lib.format.open_memmap(tmp_maps, mode="w+", dtype=np.float16, shape=(n, k, size, size))
            del arr
        if distributed:
            import torch.distributed as dist

            dist.broadcast(refs, 0)  # one set of references, whatever the ranks' numerics
        _barrier()
        arr = np.lib.format.open_memmap(tmp_maps, mode="r+")
        rows = range(rank, n, world)
        it = rows
        if show_progress and rank == 0:
            from tqdm.auto import tqdm

            it = tqdm(rows, desc="saliency cache (RISE)", unit="img")
        for i in it:
            r = refs[i]
            ok = r >= 0
            if not bool(ok.any()):
                arr[i] = 0
                continue
            q = _image(images[i]).to(dev)
            # (k', H, W): one pass over the query's masks for all of its references
            sal = rise.attribute(q, reference_embeddings=emb[r[ok].to(emb.device)], seed=_seed_for(seed, i))
            if sal.shape[-1] != size:
                sal = (F.adaptive_avg_pool2d(sal[None], size) if sal.shape[-1] > size
                       else F.interpolate(sal[None], size=(size, size), mode="bilinear", align_corners=False))[0]
            row = np.zeros((k, size, size), dtype=np.float16)
            row[ok.numpy()] = sal.float().cpu().numpy().astype(np.float16)
            arr[i] = row
        arr.flush()
        del arr
        _barrier()
        if rank == 0:
            os.replace(tmp_maps, out / _MAPS)
            atomic_write(out / _REFS, lambda f: np.save(f, refs.numpy()))
            manifest = {"format": _FORMAT, "fingerprint": fp, "n": n, "k": k, "size": size, "dtype": "float16",
                        "files": {"maps": _MAPS, "references": _REFS}, "n_valid": int((refs >= 0).sum()),
                        "world_size": world, "build_time_s": round(time.perf_counter() - t0, 3)}
            atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _barrier()

    @classmethod
    def _matching(cls, path: Path, fp: dict) -> SaliencyCache | None:
        """The finished cache at path if its fingerprint is ``fp``, else None."""
        try:
            cache = cls.open(path)
        except (FileNotFoundError, ValueError, json.JSONDecodeError, OSError):
            return None
        return cache if cache.fingerprint == json.loads(json.dumps(fp)) else None

    @staticmethod
    @torch.no_grad()
    def _references(sim: SimilarityModel, emb: Tensor, k: int, labels: Tensor | None) -> Tensor:
        """(N, K) int64: each image's K most similar other images (same label if labels), -1 padded."""
        n = emb.shape[0]
        refs = torch.full((n, k), -1, dtype=torch.long)
        chunk = 1024
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            scores = sim.pairwise(emb[s:e], emb).cpu()                   # (c, N)
            scores[torch.arange(e - s), torch.arange(s, e)] = -float("inf")
            if labels is not None:
                scores[labels[s:e, None] != labels[None, :]] = -float("inf")
            kk = min(k, n)
            top = scores.topk(kk, dim=1)
            idx = torch.where(torch.isfinite(top.values), top.indices, torch.full_like(top.indices, -1))
            refs[s:e, :kk] = idx
        return refs


@torch.no_grad()
def _embed_all(sim: SimilarityModel, images: Dataset, batch_size: int, dev: torch.device) -> Tensor:
    """(N, D) embeddings of every image of the data set, in batches."""
    out = []
    n = len(images)
    for s in range(0, n, batch_size):
        x = torch.stack([_image(images[i]) for i in range(s, min(n, s + batch_size))]).to(dev)
        out.append(sim(x))
    return torch.cat(out)
