"""Where the whymatch ops can run: the compiled CUDA kernels with a visible device, or the CPU.

``cuda_status()`` answers from the CUDA module's own runtime (``_C_cuda.device_info``), the NVIDIA
driver library and torch's view, and says in words why CUDA cannot be used: the kernels were not
compiled, this torch is a CPU build, there is no NVIDIA driver (no GPU on this machine, or its driver
is not installed), the driver is older than the CUDA runtime the kernels were built with, or no
device is visible. ``resolve_device('auto' | 'cpu' | 'cuda' | 'cuda:N')`` turns a device option into
a ``torch.device`` or a one-line ValueError naming the option, what was asked and what is available.

The three probes (``_device_info``, ``_driver_version``, ``_torch_cuda``) are module functions so
that tests can replace them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch

from . import _ext

__all__ = ["CudaStatus", "cuda_status", "resolve_device", "DEVICE_CHOICES"]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"

# kinds of CudaStatus, in words for `whymatch info`
OK, NOT_COMPILED, NO_DRIVER, OLD_DRIVER, NO_DEVICE, TORCH_CPU, ERROR = (
    "ok", "not_compiled", "no_driver", "driver_too_old", "no_device", "torch_cpu_build", "runtime_error")


@dataclass
class CudaStatus:
    """Whether the ops can run on CUDA here, and why not in words.

    Attributes:
        available: the CUDA kernels are compiled, their runtime sees a device and torch can put tensors on it.
        kind: 'ok', 'not_compiled', 'no_driver', 'driver_too_old', 'no_device', 'torch_cpu_build' or
            'runtime_error'.
        reason: one line for a person (None when available).
        devices: (name, 'major.minor') of every device the kernels' runtime sees.
        driver_version: CUDA version the driver supports, e.g. 12040 (None: no driver library).
        runtime_version: CUDA runtime the kernels were built with, e.g. 13000 (None: not compiled).
    """

    available: bool
    kind: str
    reason: str | None
    devices: list[tuple[str, str]] = field(default_factory=list)
    driver_version: int | None = None
    runtime_version: int | None = None


def _version(v: int | None) -> str:
    return "?" if not v else f"{v // 1000}.{v % 1000 // 10}"


def _device_info() -> dict | None:
    """The CUDA module's runtime view ({'error', 'devices', 'runtime_version'}), None when not compiled."""
    mod = _ext.cuda_module()
    return None if mod is None else dict(mod.device_info())


def _driver_version() -> int | None:
    """The CUDA version the installed NVIDIA driver supports (cuDriverGetVersion), None without libcuda."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int(0)
    try:
        rc = lib.cuDriverGetVersion(ctypes.byref(v))
    except AttributeError:
        return None
    return int(v.value) if rc == 0 else None


def _torch_cuda() -> tuple[bool, int, str | None]:
    """(torch.cuda.is_available(), device count, torch.version.cuda)."""
    ok = torch.cuda.is_available()
    return ok, (torch.cuda.device_count() if ok else 0), torch.version.cuda


def cuda_status() -> CudaStatus:
    """Whether the CUDA kernels can run here and, when not, why (see :class:`CudaStatus`)."""
    info = _device_info()
    if info is None:
        why = _ext.import_error("_C_cuda") or "built without a CUDA compiler (WHYMATCH_CUDA=OFF or no nvcc)"
        return CudaStatus(False, NOT_COMPILED, f"the CUDA kernels were not compiled ({why})")
    runtime = int(info.get("runtime_version") or 0) or None
    devices = [(str(n), f"{cc // 10}.{cc % 10}") for n, cc in info.get("devices", [])]
    err = info.get("error")
    driver = _driver_version()
    if err or not devices:
        if driver is None:
            kind, why = NO_DRIVER, ("no NVIDIA driver on this machine (libcuda.so.1 not found): no GPU here, or "
                                    "its driver is not installed")
        elif runtime and driver < runtime:
            kind, why = OLD_DRIVER, (f"the NVIDIA driver supports CUDA {_version(driver)}, older than the CUDA "
                                     f"runtime {_version(runtime)} the kernels were built with: update the driver "
                                     f"(or rebuild with an older CUDA toolkit)")
        elif not err or "no cuda-capable device" in str(err).lower():
            kind, why = NO_DEVICE, (f"the NVIDIA driver (CUDA {_version(driver)}) sees no GPU: none installed, "
                                    f"or hidden by CUDA_VISIBLE_DEVICES / the container")
        else:
            kind, why = ERROR, f"the CUDA runtime reports: {err}"
        return CudaStatus(False, kind, why, devices, driver, runtime)
    ok, _count, torch_cuda = _torch_cuda()
    if not ok:
        why = ("this torch is a CPU build (torch.version.cuda is None): install a CUDA build of torch"
               if torch_cuda is None else f"torch (CUDA {torch_cuda}) cannot use the GPU: torch.cuda.is_available() "
                                          f"is False")
        return CudaStatus(False, TORCH_CPU, why, devices, driver, runtime)
    return CudaStatus(True, OK, None, devices, driver, runtime)


def resolve_device(spec: str, option: str = "--device") -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> a torch.device that can run here.

    'auto' is cuda:0 when :func:`cuda_status` says the CUDA kernels can run, else cpu.

    Raises:
        ValueError: a malformed spec, or CUDA asked where it cannot run (one line: the option, what was
            asked, why not, what is available).
    """
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if cuda_status().available else torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise ValueError(f"{option} must be {DEVICE_CHOICES}, got {spec!r}")
    if dev.type == "cpu":
        return torch.device("cpu")
    st = cuda_status()
    if not st.available:
        raise ValueError(f"{option} {spec}: CUDA cannot be used here: {st.reason}; available: cpu")
    n = _torch_cuda()[1]
    index = 0 if dev.index is None else dev.index
    if index >= n:
        have = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(n)])
        raise ValueError(f"{option} {spec}: there {'is' if n == 1 else 'are'} {n} CUDA device"
                         f"{'' if n == 1 else 's'}; available: {have}")
    return torch.device("cuda", index)
