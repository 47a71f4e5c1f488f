"""Bulk RISE saliency maps for training SANE's attribute model, memory-mapped on disk.

SANE (Plummer et al., ECCV 2020, section 3.2) supervises the attribute maps with the
saliency maps of each training image's matches with its most similar images (Eq. 2).
Those maps cost N forward passes each, so they are computed once, stored as a float16
array on disk and reused across epochs and runs:

    path/manifest.json          fingerprint, shapes, the data files' names and sha256; replaced
                                atomically and last: it alone says which files make the cache
    path/maps-<id>.npy          (N, K, s, s) float16, RISE maps of image i against its K references
    path/references-<id>.npy    (N, K) int64 reference indices, -1 where fewer than K exist
    path/.build.lock            held (fcntl.flock) by the process that builds or checks the cache

One RISE pass per image explains it against all of its K references at once.

Safety: builds of one cache are serialized by the lock (a second process waits, then reuses
the finished cache); every build writes files of new names and publishes them by replacing
the manifest, so at every instant the directory holds the previous complete cache or the new
one, whatever fails or is killed; files no manifest names are removed by the next build.
:meth:`SaliencyCache.open` checks the manifest's keys and types, the files' shapes, dtypes and
sha256, and says in one line which path is wrong; a builder rebuilds such a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..io import FileFormatError, atomic_write, atomic_write_text, read_json_file
from ..ops import _validate as V
from ..similarity import SimilarityModel
from ..train.distributed import barrier as _barrier, dist_info as _dist

__all__ = ["SaliencyCache", "SaliencyCacheError", "MANIFEST"]

MANIFEST = "manifest.json"
LOCK = ".build.lock"
_FORMAT = 2
# data files a build writes (the next build removes those no manifest names); without an id: format 1's names
_DATA_FILE = re.compile(r"^(?P<kind>maps|references)(?:-(?P<id>[0-9a-f]{8,64}))?\.npy(?P<partial>\.partial)?$")
_KEYS = ("format", "fingerprint", "n", "k", "size", "files", "sha256")


class SaliencyCacheError(FileFormatError):
    """A saliency cache directory that cannot be used as it is (one line naming the path and what is wrong)."""


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

    def __init__(self, path: str | os.PathLike, manifest: dict, *, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = _check_manifest(self.path / MANIFEST, manifest)
        self._maps: np.memmap | None = None
        n, k, s = manifest["n"], manifest["k"], manifest["size"]
        maps_file, refs_file = self._file("maps"), self._file("references")
        for f in (maps_file, refs_file):
            if not f.is_file():
                raise FileNotFoundError(f"saliency cache at {self.path} is incomplete: {f} is missing")
        if verify:
            for kind, f in (("maps", maps_file), ("references", refs_file)):
                got = _file_sha256(f)
                if got != manifest["sha256"][kind]:
                    raise SaliencyCacheError(f"saliency cache file {f} does not match its manifest (sha256 "
                                             f"{got[:12]}..., manifest {manifest['sha256'][kind][:12]}...): "
                                             "changed or corrupted")
        refs = _load_npy(refs_file, "references")
        if refs.dtype != np.int64 or refs.shape != (n, k):
            raise SaliencyCacheError(f"saliency cache file {refs_file} holds {refs.dtype} {refs.shape}, "
                                     f"the manifest says int64 ({n}, {k})")
        if refs.size and (int(refs.min()) < -1 or int(refs.max()) >= n):
            raise SaliencyCacheError(f"saliency cache file {refs_file} holds reference indices in "
                                     f"[{int(refs.min())}, {int(refs.max())}], expected -1 or [0, {n})")
        self.references = torch.from_numpy(np.array(refs))
        maps = self.maps
        if maps.dtype != np.float16 or tuple(maps.shape) != (n, k, s, s):
            raise SaliencyCacheError(f"saliency cache file {maps_file} holds {maps.dtype} {tuple(maps.shape)}, "
                                     f"the manifest says float16 ({n}, {k}, {s}, {s})")

    def _file(self, kind: str) -> Path:
        return self.path / self.manifest["files"][kind]

    # ---------------------------------------------------------------- access
    @property
    def maps(self) -> np.memmap:
        """(N, K, s, s) float16 read-only memory map."""
        if self._maps is None:
            self._maps = _load_npy(self._file("maps"), "maps", mmap=True)
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
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> SaliencyCache:
        """Open a finished cache.

        Args:
            path: the cache directory.
            verify: check the data files' sha256 against the manifest (reads them once).

        Raises:
            FileNotFoundError: no manifest (never built, or its first build is unfinished), or a
                data file it names is missing; names the path.
            SaliencyCacheError (a ValueError): a manifest that is not JSON, not an object, lacks
                keys or has values of the wrong type; data files that are not .npy arrays, whose
                dtype or shape disagree with the manifest, or whose sha256 differs (one line, naming the path).
        """
        p = Path(path)
        man = p / MANIFEST
        if not man.is_file():
            raise FileNotFoundError(f"no finished saliency cache at {p}: {man} is missing "
                                    "(build one with SaliencyCache.build)")
        try:
            manifest = read_json_file(man, "saliency cache manifest", required_keys=_KEYS)
        except SaliencyCacheError:
            raise
        except FileFormatError as exc:
            raise SaliencyCacheError(str(exc)) from None
        return cls(p, manifest, verify=verify)

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

        Reuse, concurrency and crash safety: the build holds ``path/.build.lock`` (``fcntl.flock``;
        a second process building the same cache waits for it). When the finished cache at
        ``path`` passes :meth:`open`'s checks (sha256 included) and its fingerprint
        (:meth:`fingerprint_of`) equals this call's, it is reused (no RISE call). Otherwise the
        maps and references are written into files of new names and published by replacing the
        manifest (atomically, last); the previous cache stays complete and usable until then. A
        build that was interrupted leaves files no manifest names: the next build removes them
        and starts over (there is no resume of a partial build). A manifest or data file that is
        corrupt, of the wrong shape or type, or changed since it was written is rebuilt.

        Under torch.distributed every rank must call this with the same arguments: rank 0 takes
        the lock, rank r computes rows r, r + world, ... into the shared file (the path must be
        on a file system all ranks see), then rank 0 publishes it after a barrier.

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
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
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
        if out.exists() and not out.is_dir():
            raise ValueError(f"path {out} is an existing file, not a directory")
        fp = cls.fingerprint_of(sim, images, k=k, labels=labels, size=size, n_masks=n_masks, grid=grid,
                                p=float(p), seed=seed)
        distributed, rank, world = _dist()

        with _build_lock(out) if rank == 0 else contextlib.nullcontext():
            _barrier()  # the other ranks look at the directory only once rank 0 holds the lock
            existing = cls._matching(out, fp)
            reuse = existing is not None
            if distributed:  # every rank must take the same branch
                import torch.distributed as dist

                flag = torch.tensor([1 if reuse else 0])
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                reuse = bool(flag.item())
            if reuse:
                if rank == 0:
                    _remove_unnamed(out, existing.manifest)
                _barrier()
                return existing
            dev = sim.device
            was_training = sim.training
            sim.eval()
            try:
                manifest = cls._compute(sim, rise, images, out, fp, k=k, labels=labels, size=size,
                                        batch_size=batch_size, seed=seed, show_progress=show_progress, dev=dev)
            finally:
                sim.train(was_training)
            return cls(out, manifest, verify=False)  # the files were just hashed

    @classmethod
    def _compute(cls, sim, rise, images, out: Path, fp: dict, *, k: int, labels: Tensor | None, size: int,
                 batch_size: int, seed: int, show_progress: bool, dev: torch.device) -> dict:
        """Write the maps and references into files of new names, then publish them with the manifest
        (rank 0; the lock is held). Returns the manifest."""
        distributed, rank, world = _dist()
        t0 = time.perf_counter()
        n = len(images)
        emb = _embed_all(sim, images, batch_size, dev)
        refs = cls._references(sim, emb, k, labels)
        names = [None, None]
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _remove_unnamed(out, _manifest_or_none(out))  # what interrupted builds left
            ident = f"{time.time_ns():x}{secrets.token_hex(4)}"
            names = [f"maps-{ident}.npy", f"references-{ident}.npy"]
        if distributed:
            import torch.distributed as dist

            dist.broadcast(refs, 0)  # one set of references, whatever the ranks' numerics
            dist.broadcast_object_list(names, 0)
        maps_name, refs_name = names
        maps_path = out / maps_name
        try:
            if rank == 0:
                arr = np.lib.format.open_memmap(maps_path, mode="w+", dtype=np.float16, shape=(n, k, size, size))
                del arr
            _barrier()
            arr = np.lib.format.open_memmap(maps_path, mode="r+")
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
            manifest = None
            if rank == 0:
                with open(maps_path, "rb+") as f:
                    os.fsync(f.fileno())
                atomic_write(out / refs_name, lambda f: np.save(f, refs.numpy()))
                manifest = {"format": _FORMAT, "fingerprint": fp, "n": n, "k": k, "size": size, "dtype": "float16",
                            "files": {"maps": maps_name, "references": refs_name},
                            "sha256": {"maps": _file_sha256(maps_path), "references": _file_sha256(out / refs_name)},
                            "n_valid": int((refs >= 0).sum()), "world_size": world,
                            "build_time_s": round(time.perf_counter() - t0, 3)}
                atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # the publication
                _remove_unnamed(out, manifest)  # the previous cache's files
        except BaseException:
            if rank == 0 and not distributed:  # under DDP the next build cleans up
                for f in (maps_path, out / refs_name):
                    if f.name not in (_manifest_or_none(out) or {}).get("files", {}).values():
                        with contextlib.suppress(OSError):
                            f.unlink()
            raise
        if distributed:
            import torch.distributed as dist

            box = [manifest]
            dist.broadcast_object_list(box, 0)
            manifest = box[0]
        _barrier()
        return manifest

    @classmethod
    def _matching(cls, path: Path, fp: dict) -> SaliencyCache | None:
        """The finished cache at path if it passes every check and its fingerprint is ``fp``, else None."""
        try:
            cache = cls.open(path, verify=False)
            if cache.fingerprint != json.loads(json.dumps(fp)):
                return None
            return cls.open(path, verify=True)
        except (FileNotFoundError, ValueError, OSError):
            return None

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


# ------------------------------------------------------------------ files


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_manifest(path: Path, m: object) -> dict:
    """The manifest's keys and value types, or SaliencyCacheError naming ``path`` and the first problem."""
    def bad(what: str) -> SaliencyCacheError:
        return SaliencyCacheError(f"saliency cache manifest {path} {what}")

    if not isinstance(m, dict):
        raise bad(f"must hold a JSON object, got {type(m).__name__}")
    missing = [key for key in _KEYS if key not in m]
    if missing:
        raise bad(f"lacks the keys {', '.join(map(repr, missing))}")
    if m["format"] != _FORMAT or isinstance(m["format"], bool):
        raise bad(f"has format {m['format']!r}, expected {_FORMAT} (written by another whymatch version)")
    for key in ("n", "k", "size"):
        if not _is_count(m[key]):
            raise bad(f"has {key} {m[key]!r}, expected an int >= 1")
    if not isinstance(m["fingerprint"], dict):
        raise bad(f"has fingerprint of type {type(m['fingerprint']).__name__}, expected an object")
    for key in ("files", "sha256"):
        if not isinstance(m[key], dict) or set(m[key]) != {"maps", "references"}:
            raise bad(f"has {key} {m[key]!r}, expected an object with the keys 'maps' and 'references'")
    for kind, name in m["files"].items():
        g = _DATA_FILE.match(name) if isinstance(name, str) else None
        if g is None or g.group("kind") != kind or g.group("partial"):
            raise bad(f"names the {kind} file {name!r}, expected '{kind}-<hex id>.npy' in the cache directory")
    for kind, digest in m["sha256"].items():
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise bad(f"has sha256 of {kind} {digest!r}, expected 64 hex digits")
    return m


def _manifest_or_none(out: Path) -> dict | None:
    """The manifest at ``out`` if it is valid, else None."""
    try:
        return _check_manifest(out / MANIFEST, read_json_file(out / MANIFEST, "saliency cache manifest"))
    except (OSError, ValueError):
        return None


def _remove_unnamed(out: Path, manifest: dict | None) -> None:
    """Remove the data files (and partial files) of ``out`` that ``manifest`` does not name (the lock is held)."""
    keep = set(manifest["files"].values()) if manifest else set()
    with contextlib.suppress(OSError):
        for e in os.scandir(out):
            if _DATA_FILE.match(e.name) and e.name not in keep and e.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
        for e in os.scandir(out):  # temporary files of atomic_write left by a killed build
            if (e.name.startswith(".references-") or e.name.startswith(f".{MANIFEST}.")) and e.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_npy(path: Path, what: str, mmap: bool = False) -> np.ndarray:
    """np.load without pickles; a file that is not a .npy array -> SaliencyCacheError naming it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"saliency cache file {path} ({what}) is missing") from None
    except (ValueError, OSError, EOFError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SaliencyCacheError(f"saliency cache file {path} ({what}) is not a readable .npy array: {text}") from None


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.build.lock`` exclusively (fcntl.flock; waits for another builder). Where fcntl is
    missing (Windows) builds are not serialized; where the directory is read-only no lock is taken
    (a finished cache is still reused; a build would fail on its first write, naming the file)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"path {out} is an existing file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the saliency cache directory {out}: {exc.strerror or exc}") from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX)
        yield
        return
    try:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only cache (shared, prebuilt)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
