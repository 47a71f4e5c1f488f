"""--device auto|cpu|cuda[:N] of the main commands and `whymatch info`'s GPU line, with the probes replaced
(no GPU is needed: the CUDA runtime, the driver library and torch's view are monkeypatched)."""

from __future__ import annotations

import pytest
import torch

from whymatch import cli
from whymatch.ops import devices


def _probes(monkeypatch, *, compiled=True, error=None, found=(), driver=None, runtime=13000, torch_cuda=None):
    """Replace the three probes of whymatch.ops.devices."""
    info = None if not compiled else {"error": error, "devices": list(found), "runtime_version": runtime}
    monkeypatch.setattr(devices, "_device_info", lambda: info)
    monkeypatch.setattr(devices, "_driver_version", lambda: driver)
    ok = torch_cuda if torch_cuda is not None else bool(found)
    monkeypatch.setattr(devices, "_torch_cuda", lambda: (ok, len(found) if ok else 0, "12.8" if ok else None))


INSUFFICIENT = "CUDA driver version is insufficient for CUDA runtime version"


def test_no_driver_is_told_apart_from_an_old_driver(monkeypatch, capsys):
    # the same runtime error on both machines: no libcuda at all, or a libcuda older than the runtime
    _probes(monkeypatch, error=INSUFFICIENT, driver=None)
    st = devices.cuda_status()
    assert (st.available, st.kind) == (False, "no_driver")
    assert cli.main(["info"]) == 0
    no_gpu = capsys.readouterr().out
    assert "no NVIDIA driver" in no_gpu and "insufficient" not in no_gpu

    _probes(monkeypatch, error=INSUFFICIENT, driver=12040)
    st = devices.cuda_status()
    assert (st.available, st.kind) == (False, "driver_too_old")
    assert cli.main(["info"]) == 0
    old = capsys.readouterr().out
    assert "supports CUDA 12.4" in old and "runtime 13.0" in old and "update the driver" in old
    assert "no NVIDIA driver" not in old


def test_driver_without_a_device_and_other_failures(monkeypatch):
    _probes(monkeypatch, error="no CUDA-capable device is detected", driver=13000)
    assert devices.cuda_status().kind == "no_device"
    _probes(monkeypatch, error="unknown error", driver=13000)
    st = devices.cuda_status()
    assert st.kind == "runtime_error" and "unknown error" in st.reason
    _probes(monkeypatch, compiled=False)
    assert devices.cuda_status().kind == "not_compiled"
    # the kernels see a GPU but torch is a CPU build: CUDA tensors cannot exist
    _probes(monkeypatch, found=[("NVIDIA H200", 90)], driver=13000, torch_cuda=False)
    st = devices.cuda_status()
    assert (st.available, st.kind) == (False, "torch_cpu_build") and "CUDA build of torch" in st.reason


def test_auto_picks_cuda_only_when_kernels_and_a_device_are_there(monkeypatch):
    _probes(monkeypatch, error=INSUFFICIENT)
    assert devices.resolve_device("auto") == torch.device("cpu")
    _probes(monkeypatch, found=[("NVIDIA H200", 90)], driver=13000)
    assert devices.cuda_status().available
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device cuda:2: there is 1 CUDA device; available: cpu, cuda:0"):
        devices.resolve_device("cuda:2")
    # compiled kernels, but torch cannot use the GPU: auto stays on the CPU
    _probes(monkeypatch, found=[("NVIDIA H200", 90)], driver=13000, torch_cuda=False)
    assert devices.resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("command", ["demo", "explain", "search-explain"])
def test_cuda_asked_where_unavailable_is_one_line_before_any_work(monkeypatch, capsys, tmp_path, command):
    _probes(monkeypatch, error=INSUFFICIENT, driver=None)
    argv = {"demo": ["demo"], "explain": ["explain", "q.png", "r.png"],
            "search-explain": ["search-explain", "q.png", "--gallery", str(tmp_path)]}[command]
    out = tmp_path / "out"
    assert cli.main(argv + ["--out", str(out), "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device" in err and "cuda:1" in err
    assert "no NVIDIA driver" in err and "available: cpu" in err
    assert not out.exists()


def test_bad_device_names(capsys):
    for bad in ("tpu", "cpu:1", "cuda:x", ""):
        assert cli.main(["demo", "--device", bad]) == 2
        err = capsys.readouterr().err
        assert "--device" in err and "auto, cpu, cuda or cuda:N" in err


def test_demo_passes_the_resolved_device(monkeypatch, tmp_path):
    from whymatch import jobs

    seen = {}

    def fake_run_demo(out, **kw):
        seen.update(kw)
        return [{"method": "rise"}], tmp_path / "index.html"

    monkeypatch.setattr(jobs, "run_demo", fake_run_demo)
    _probes(monkeypatch, error=INSUFFICIENT)
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--device", "auto"]) == 0
    assert seen["device"] == torch.device("cpu")
    _probes(monkeypatch, found=[("NVIDIA H200", 90)], driver=13000)
    assert cli.main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert seen["device"] == torch.device("cuda", 0)
    assert seen["methods"] == jobs.METHODS  # on CUDA the demo runs every method


def test_info_json_carries_the_diagnosis(monkeypatch, capsys):
    import json

    _probes(monkeypatch, error=INSUFFICIENT, driver=12040)
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cuda_status"]["kind"] == "driver_too_old" and info["cuda_status"]["available"] is False
