import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture
def gen():
    """A fresh seeded CPU generator per test."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def single_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("single_thread")``): tiny
    convolutions run far faster on one thread than on two contended ones. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def emu():
    """The host emulation of ``_C_cuda`` (tests/cuda_emulation: the real .cu files compiled with g++),
    built or reused once per session. Test files with their own build variant override it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from cuda_emulation import build
    from helpers import emulated_module_path

    return build.load(emulated_module_path())
