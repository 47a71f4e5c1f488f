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
    assert info["cpu_kernels"] == list(_ext.op_table()["ops"])
    if info["cuda_kernels"]:
        assert set(info["cuda_kernels"]) == set(info["cpu_kernels"])
    if info["cuda_kernels"]:
        assert info["cuda_architectures"] and "native" not in ",".join(info["cuda_architectures"])
        assert all(a[:2].isdigit() for a in info["cuda_architectures"])
    assert isinstance(info["cuda_devices"], list)


def test_op_table_names_every_registered_op_and_the_constants():
    import torch

    table = _ext.op_table()
    assert table is not None and table is _ext.cpu_module().table
    mod = _ext.cuda_module()
    if mod is not None:
        assert mod.table == table and mod.ops == table["ops"]
    # every op in the table is a compiled entry, and every entry a registered op's kernel launches is in it
    assert all(callable(getattr(_ext.cpu_module(), name)) for name in table["ops"])
    entries = {"rise_apply", "rise_saliency", "ranked_blend", "soft_mask", "avsl_distance", "avsl_distance_backward",
               "avsl_topk", "avsl_cam_correlation", "avsl_cam_reliability"}
    assert entries <= set(table["ops"])
    registered = {name for name in dir(torch.ops.whymatch) if not name.startswith("_")}
    assert {"rise_apply", "rise_apply_out", "soft_mask_backward", "avsl_edge_update_"} <= registered
    # the Python constants are the table's
    codes = table["dtype_codes"]
    assert _ext.DTYPE_CODES == {torch.float32: codes["float32"], torch.float16: codes["float16"],
                                torch.bfloat16: codes["bfloat16"]}
    assert _ext.FLOAT64_CODE == codes["float64"] and len(set(codes.values())) == len(codes)
    from whymatch.ops import avsl

    assert avsl._MAX_LEVELS == table["limits"]["avsl_max_levels"]
    assert (avsl.WS_DISTANCE, avsl.WS_BACKWARD, avsl.WS_TOPK) == tuple(
        table["avsl_workspace"][k] for k in ("distance", "backward", "topk"))


def test_a_module_whose_table_disagrees_is_refused(monkeypatch):
    import pytest

    class Other:
        __version__ = whymatch.__version__
        table = {**_ext.op_table(), "dtype_codes": {"float32": 0, "float16": 1}}

    monkeypatch.setattr(_ext, "_cache", {})
    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: Other())
    with pytest.raises(RuntimeError, match=r"op table lacks dtype_codes \['bfloat16', 'float64'\]"):
        _ext.cpu_module()
    Other.table = {**_ext.op_table(), "limits": {"avsl_max_levels": 4}}
    with pytest.raises(RuntimeError, match="differs from the other compiled module"):
        _ext.cpu_module()
    del Other.table
    with pytest.raises(RuntimeError, match="exports no op table"):
        _ext.cpu_module()


def test_compiled_modules_match_the_package_version():
    assert _ext.cpu_module().__version__ == whymatch.__version__
    mod = _ext.cuda_module()
    if mod is not None:
        assert mod.__version__ == whymatch.__version__


def test_import_works_without_a_driver_and_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "whymatch.cli", "info"], capture_output=True, text=True, check=True)
    assert "CPU kernels:  rise_apply, rise_saliency, ranked_blend" in out.stdout
    assert "CUDA devices:" in out.stdout


def test_cmake_cuda_on_without_nvcc_says_how_to_fix(tmp_path):
    import os
    import shutil
    from pathlib import Path

    import pytest

    pybind11 = pytest.importorskip("pybind11")
    if shutil.which("cmake") is None:
        pytest.skip("cmake not on PATH")
    src = Path(__file__).resolve().parents[1]
    if not (src / "CMakeLists.txt").is_file():
        pytest.skip("source tree not available")
    env = dict(os.environ, CUDACXX=str(tmp_path / "no-nvcc"))
    run = subprocess.run(["cmake", "-S", str(src), "-B", str(tmp_path / "b"), "-DWHYMATCH_CUDA=ON",
                          f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"], capture_output=True, text=True, env=env)
    assert run.returncode != 0
    text = " ".join((run.stdout + run.stderr).split())
    assert "WHYMATCH_CUDA=ON but no CUDA compiler (nvcc) was found" in text and "WHYMATCH_CUDA=OFF" in text


def test_cpu_module_needs_no_libmvec():
    # the CPU kernels carry their own vector exp (csrc/common/vec_math.h): the module must not
    # depend on glibc's libmvec (absent before glibc 2.22, as on manylinux2014)
    path = _ext.cpu_module().__file__
    with open(path, "rb") as f:
        data = f.read()
    assert b"libmvec" not in data
