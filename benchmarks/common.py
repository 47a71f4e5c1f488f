"""Shared helpers for the whymatch benchmarks: timing, machine info, peak memory, result files.

Timing: warm-up calls first (module load, thread pools, cuDNN autotuning and
allocator growth stay out of the numbers), then ``repeats`` timed calls; the
median is the number reported, min / max / spread say how noisy it was. On
CUDA each call is timed with CUDA events recorded on the current stream and the
device is synchronized before the events are read; on the CPU with
``time.perf_counter``.

Peak memory on the CPU: torch's CPU allocations go straight to malloc / mmap,
so ``tracemalloc`` does not see them. :func:`peak_rss_region` measures the
process's resident set instead: it reads VmRSS from /proc/self/status, resets
the kernel's high-water mark (writing 5 to /proc/self/clear_refs, Linux >= 4.0)
and reads VmHWM after the region; peak = VmHWM - VmRSS before. Run each
variant in a fresh process (see rise_cpu.py) so that one variant's freed
memory cannot hide another's.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


# --------------------------------------------------------------------------- timing

def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and relative spread (max - min) / median of a list of seconds."""
    ts = sorted(float(t) for t in times)
    med = statistics.median(ts)
    return {
        "median_s": med,
        "min_s": ts[0],
        "max_s": ts[-1],
        "spread": (ts[-1] - ts[0]) / med if med > 0 else 0.0,
        "repeats": len(ts),
        "times_s": ts,
    }


def _cuda_sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5,
            device: torch.device | str | None = None, setup: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones; see :func:`summarize`.

    ``device`` of type cuda times with CUDA events on the current stream;
    otherwise the host clock. ``setup`` (untimed) runs before every call,
    e.g. to free the previous call's output.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    _cuda_sync(device)
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            _cuda_sync(device)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return summarize(times)


class PhaseTimer:
    """Accumulates host-clock seconds per named phase: ``with pt("blend"): ...``.

    Synchronizes ``device`` (when CUDA) at both ends of each phase, so that the
    split is exact but the phases no longer overlap; use it for breakdowns only.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                _cuda_sync(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                _cuda_sync(timer.device)
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.t0
                return False

        return _Ctx()


def median_phases(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-phase median over several PhaseTimer.totals dicts."""
    keys = list(dict.fromkeys(k for r in runs for k in r))
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


# --------------------------------------------------------------------------- memory (CPU)

def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size (VmRSS), or None where /proc is missing."""
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter VmHWM to the current RSS; False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak resident set size since start or the last reset: VmHWM, else ru_maxrss."""
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb * 1024


def peak_rss_region(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn()`` once and return the peak RSS it added over the RSS right before it."""
    import gc

    gc.collect()
    before = rss_bytes()
    reset = reset_peak_rss()
    hwm_before = peak_rss_bytes()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    del result
    return {
        "rss_before_bytes": before,
        "hwm_before_bytes": hwm_before,
        "peak_bytes": peak,
        "peak_over_before_bytes": None if peak is None or before is None else peak - before,
        "hwm_reset": reset,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- machine info

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def system_load() -> dict[str, Any]:
    """Load average and Linux CPU pressure (PSI 'some' avg10 %): other work on the machine skews CPU timings."""
    out: dict[str, Any] = {"loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
        out["cpu_pressure_some_avg10"] = float(some[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        out["cpu_pressure_some_avg10"] = None
    return out


def load_note(res: dict[str, Any]) -> str:
    """One markdown sentence on the machine's load at the start and end of a CPU benchmark."""
    def one(d: dict[str, Any] | None) -> str:
        if not d:
            return "n/a"
        la = d.get("loadavg_1_5_15")
        psi = d.get("cpu_pressure_some_avg10")
        return (f"load {la[0]:.2f}" if la else "load n/a") + (f", CPU pressure {psi:.0f}%" if psi is not None else "")

    return (f"Machine load at start: {one(res.get('machine', {}).get('load_at_start'))}; at end: "
            f"{one(res.get('load_at_end'))} (other work on the machine inflates times).\n")


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Device, CPU model, versions, thread count, build info: what a reader needs to compare runs."""
    import whymatch

    device = torch.device(device)
    info: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_at_start": system_load(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "whymatch": whymatch.__version__,
        "git_commit": git_commit(),
    }
    try:
        info["whymatch_build"] = whymatch.build_info()
    except Exception as exc:  # noqa: BLE001 - informational only
        info["whymatch_build"] = f"build_info() failed: {exc}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": p.name,
            "gpu_capability": f"{p.major}.{p.minor}",
            "gpu_memory_bytes": p.total_memory,
            "gpu_sm_count": p.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(),
        })
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    return info


# --------------------------------------------------------------------------- numbers

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on a's device (inf when b is zero and a is not, nan on any NaN)."""
    a64, b64 = a.detach().double(), b.detach().to(a.device).double()
    num = torch.linalg.vector_norm(a64 - b64).item()
    den = torch.linalg.vector_norm(b64).item()
    if math.isnan(num):
        return math.nan
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files

def _clean(o: Any) -> Any:
    """JSON-ready copy: non-finite floats become strings ('nan', 'inf'), torch objects become str / lists."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, bool) or o is None or isinstance(o, (int, str)):
        return o
    if isinstance(o, float):
        return o if math.isfinite(o) else str(o)
    if isinstance(o, torch.Tensor):
        return _clean(o.tolist())
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if hasattr(o, "item"):  # numpy scalars
        return _clean(o.item())
    return str(o)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`whymatch.io.atomic_write_text`); returns the path."""
    from whymatch.io import atomic_write_text as write

    write(path, text)
    return Path(path)


def write_results(stem: str | Path, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (data) and ``<stem>.md`` (markdown) atomically."""
    stem = Path(stem)
    js = atomic_write_text(stem.with_suffix(".json"),
                           json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")
    md = atomic_write_text(stem.with_suffix(".md"), markdown)
    return js, md


def write_and_show(stem: str | Path, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """:func:`write_results`, then print the markdown and the two paths (the end of every results script)."""
    js, md = write_results(stem, data, markdown)
    print(md.read_text())
    print(f"wrote {js} and {md}")
    return js, md


def parser(doc: str | None):
    """An ``argparse.ArgumentParser`` that prints a script's whole module docstring as its ``--help`` text."""
    import argparse

    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


# --------------------------------------------------------------------------- ShapesWorld training runs

def shapesworld_sets(n_train: int, n_test: int, image_size: int, seed: int):
    """(train ShapesWorld, test ShapesWorld, train TensorImages, test TensorImages): the train classes
    rendered once into uint8 tensors for training, the disjoint test classes for Recall@K."""
    from whymatch.data import ShapesWorld
    from whymatch.train import TensorImages

    tr = ShapesWorld("train", n_train, image_size, seed=seed)
    te = ShapesWorld("test", n_test, image_size, seed=seed)
    return (tr, te, TensorImages(tr.images(dtype=torch.uint8), tr.labels),
            TensorImages(te.images(dtype=torch.uint8), te.labels))


def shapesworld_data_info(train, test, image_size: int) -> dict[str, Any]:
    """The 'data' entry of a ShapesWorld training benchmark's results."""
    n_train_classes = int(torch.unique(train.labels).numel())
    n_test_classes = int(torch.unique(test.labels).numel())
    return {"image_size": image_size, "n_train_images": len(train), "n_train_classes": n_train_classes,
            "n_test_images": len(test), "n_test_classes": n_test_classes, "chance_recall_at_1": 1 / n_test_classes}


def shapesworld_training_parser(doc: str, stem: str):
    """The options every ShapesWorld training benchmark shares (data, budget, threads, output)."""
    ap = parser(doc)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-test", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--p", type=int, default=16, help="classes per batch")
    ap.add_argument("--k", type=int, default=4, help="images per class per batch")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / stem, help="result path without suffix")
    return ap
