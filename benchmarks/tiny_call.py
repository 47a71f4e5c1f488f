"""Per-call cost of tiny op calls on one thread, without the rest of contention_cpu.py: its
``tiny_calls`` (mean of 2,000 calls, median of 5): the public calls (their direct CPU launch), torch.mul
for scale, and the layers of a tiny rise_apply(out=) call down to the compiled entry.

    python benchmarks/tiny_call.py            # prints microseconds per call
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contention_cpu import tiny_calls  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    for name, seconds in tiny_calls().items():
        print(f"{name:55s} {seconds * 1e6:8.1f} us/call")


if __name__ == "__main__":
    main()
