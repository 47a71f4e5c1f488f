"""Per-call cost of a tiny rise_apply (4 masks, 3 x 8 x 8), through the public function's direct CPU launch
and through the dispatcher (torch.ops.whymatch.rise_apply), best of 5 rounds of 2,000 calls, one thread.

    python benchmarks/tiny_call.py            # prints microseconds per call
"""
import time

import torch

from whymatch import ops
from whymatch.ops import _ext


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    grids = (torch.rand(4, 3, 3, generator=gen) > 0.5).float()
    shifts = torch.zeros(4, 2, dtype=torch.int64)
    image, base = torch.rand(3, 8, 8, generator=gen), torch.zeros(3, 8, 8)
    out = torch.empty(4, 3, 8, 8)
    calls = {
        "public rise_apply(out=)": lambda: ops.rise_apply(grids, shifts, image, base, out=out),
        "public rise_apply": lambda: ops.rise_apply(grids, shifts, image, base),
        "torch.ops.whymatch.rise_apply": lambda: torch.ops.whymatch.rise_apply(grids, shifts, image, base,
                                                                               torch.float32, False),
        "torch.ops.whymatch.rise_apply_out": lambda: torch.ops.whymatch.rise_apply_out(grids, shifts, image, base,
                                                                                       out),
    }
    for name, f in calls.items():
        for _ in range(200):
            f()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(2000):
                f()
            best = min(best, (time.perf_counter() - t0) / 2000)
        print(f"{name:40s} {best * 1e6:8.1f} us/call")
    _ = _ext


if __name__ == "__main__":
    main()
