"""whymatch: explain why an image similarity model matched two images.

Data flows one way: data -> SimilarityModel -> explainers / metrics -> ops -> kernels.
"""

from __future__ import annotations

from ._version import __version__
from .similarity import SimilarityModel

__all__ = ["__version__", "SimilarityModel", "build_info"]


def build_info() -> dict:
    """What was compiled and what can run here.

    Returns a dict with the package version, whether the CPU and CUDA kernel
    modules were built (and why not, when they were not), the CUDA architectures
    and compiler the CUDA kernels were built for, the devices the CUDA runtime
    sees, and torch's own view of CUDA.
    """
    import torch

    from .ops import _ext

    cpu = _ext.cpu_module()
    cuda = _ext.cuda_module()
    info: dict = {
        "version": __version__,
        "torch": torch.__version__,
        "cpu_kernels": list(cpu.ops) if cpu is not None else [],
        "cpu_module_error": _ext.import_error("_C"),
        "cpu_isa": cpu.cpu_isa() if cpu is not None and hasattr(cpu, "cpu_isa") else None,
        "cuda_kernels": list(cuda.ops) if cuda is not None else [],
        "cuda_module_error": _ext.import_error("_C_cuda"),
        "cuda_architectures": cuda.cuda_architectures.split(",") if cuda is not None else [],
        "cuda_compiler": cuda.cuda_compiler_version if cuda is not None else None,
        "cuda_devices": [],
        "cuda_runtime_error": None,
        "torch_cuda_available": torch.cuda.is_available(),
    }
    if cuda is not None:
        dev = cuda.device_info()
        info["cuda_devices"] = [{"name": n, "compute_capability": f"{cc // 10}.{cc % 10}"} for n, cc in dev["devices"]]
        info["cuda_runtime_error"] = dev["error"]
    return info
