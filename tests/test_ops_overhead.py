"""The ops' default argument checks read metadata only: no data scan, nothing that would synchronize
a GPU (aten._local_scalar_dense is what bool(t) / t.item() / float(t) dispatch to)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import whymatch.ops as ops

DATA_READS = {"_local_scalar_dense", "isfinite", "any", "all", "isnan", "isinf", "nonzero"}


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _calls():
    g = (torch.rand(6, 3, 3) > 0.5).float()
    sh = torch.randint(0, 3, (6, 2))
    img = torch.rand(3, 8, 8)
    out = torch.empty(6, 3, 8, 8)
    x = torch.rand(2, 3, 8, 8)
    att = torch.rand(2, 3, 3)
    rank = torch.stack([torch.randperm(64) for _ in range(2)])
    return {
        "rise_apply": lambda: ops.rise_apply(g, sh, img, 0.0, out=out),
        "rise_saliency": lambda: ops.rise_saliency(g, sh, torch.rand(6, 2), (8, 8)),
        "ranked_blend": lambda: ops.ranked_blend(x, x.flip(0), rank, torch.tensor([0, 10, 64])),
        "soft_mask": lambda: ops.soft_mask(x, att, torch.tensor(10.0), torch.tensor(0.5)),
    }


@pytest.mark.parametrize("name", list(_calls()))
def test_default_checks_read_no_data(name):
    fn = _calls()[name]
    ops.set_check_finite(False)
    try:
        with _Record() as rec:
            fn()
        assert not DATA_READS & set(rec.names), sorted(DATA_READS & set(rec.names))
        if name != "ranked_blend":  # (its opt-in scan runs inside the registered op, out of the recorder's view)
            ops.set_check_finite(True)  # the opt-in scans do read the data: the recorder sees them
            with _Record() as rec:
                fn()
            assert DATA_READS & set(rec.names)
    finally:
        ops.set_check_finite(None)
