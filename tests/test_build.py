"""What was built, and that it is what the Python side expects."""

from __future__ import annotations

import subprocess
import sys

import whymatch
from whymatch.ops import _ext


def test_build_info_reports_kernels_and_devices():
    info = whymatch.build_info()
    for key in ("version", "torch", "cpu_kernels", "cuda_kernels", "cuda_architectures", "cuda_devices",
                "torch_cuda_available"):
        assert key in info
    assert info["version"] == whymatch.__version__
    assert set(info["cpu_kernels"]) == {"rise_apply", "rise_saliency", "ranked_blend"}
    if info["cuda_kernels"]:
        assert info["cuda_architectures"] and "native" not in ",".join(info["cuda_architectures"])
        assert all(a[:2].isdigit() for a in info["cuda_architectures"])
    assert isinstance(info["cuda_devices"], list)


def test_compiled_modules_match_the_package_version():
    assert _ext.cpu_module().__version__ == whymatch.__version__
    mod = _ext.cuda_module()
    if mod is not None:
        assert mod.__version__ == whymatch.__version__


def test_import_works_without_a_driver_and_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "whymatch.cli", "info"], capture_output=True, text=True, check=True)
    assert "CPU kernels:  rise_apply, rise_saliency, ranked_blend" in out.stdout
    assert "CUDA devices:" in out.stdout
