"""`whymatch info`: what was compiled and which devices are visible."""

from __future__ import annotations

import json


NAME = "info"
HELP = "what was compiled and which devices are visible"


def cmd_info(args) -> int:
    from .. import build_info

    info = build_info()
    if args.json:
        from dataclasses import asdict

        from ..ops.devices import cuda_status

        info["cuda_status"] = asdict(cuda_status())
        print(json.dumps(info, indent=2))
        return 0
    print(f"whymatch {info['version']} (torch {info['torch']})")
    print(f"  CPU kernels:  {', '.join(info['cpu_kernels']) or 'none (' + str(info['cpu_module_error']) + ')'}")
    if info["cuda_kernels"]:
        print(f"  CUDA kernels: {', '.join(info['cuda_kernels'])}")
        print(f"  CUDA archs:   {', '.join(info['cuda_architectures'])} (nvcc {info['cuda_compiler']})")
    else:
        print(f"  CUDA kernels: none ({info['cuda_module_error'] or 'not compiled'})")
    devs = info["cuda_devices"]
    print("  CUDA devices: " + (", ".join(f"{d['name']} (sm {d['compute_capability']})" for d in devs)
                              or "none visible"))
    print(f"  GPU use:      {_gpu_use_line()}")
    return 0


def _gpu_use_line() -> str:
    """One line: whether `--device auto` picks CUDA here, and if not, why in words (no GPU, old driver, CPU torch,
    kernels not compiled), from :func:`whymatch.ops.devices.cuda_status`."""
    from ..ops.devices import cuda_status

    st = cuda_status()
    if st.available:
        return "--device auto runs on cuda:0 (CUDA kernels and a device available)"
    return f"CPU only: {st.reason}"


def add_options(parser) -> None:
    """The options of `whymatch info`."""
    parser.add_argument("--json", action="store_true", help="print build_info() as JSON")
