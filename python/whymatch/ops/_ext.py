"""Access to the compiled modules ``whymatch._C`` (CPU) and ``whymatch._C_cuda``, and what every
op's launch shares (dtype codes, pointers, the thread count or stream, the device guard, the
refusal of a double backward through a fused backward kernel).

This file and the op files beside it are the only Python code that touches the
compiled modules. A module that is missing makes the ops fall back to the pure
PyTorch reference (``ops/reference.py``) with one warning; a module built from a
different version of whymatch is refused with a message that says how to fix it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from types import ModuleType

import torch

from .._version import __version__

_cache: dict[str, ModuleType | None] = {}
_emulated_cuda: ModuleType | None = None  # see emulate_cuda_on_cpu
_import_errors: dict[str, str] = {}
_warned: set[str] = set()

#: What the Python side needs from the op table (csrc/op_table.h) of a compiled module: the names of
#: the dtypes it hands the kernels, the limits and the workspace kernels it sizes.
_TABLE_NEEDS = {"dtype_codes": ("float32", "float16", "bfloat16", "float64"), "limits": ("avsl_max_levels",),
                "avsl_workspace": ("distance", "backward", "topk")}
_table: dict | None = None  # the op table of the first compiled module loaded (all must agree)


def _check_table(name: str, mod: ModuleType) -> None:
    """Refuse a compiled module whose op table lacks what the Python side needs or differs from the
    other module's (a build from other sources): the constants below come from it."""
    global _table
    table = getattr(mod, "table", None)
    if not isinstance(table, dict):
        raise RuntimeError(f"whymatch.{name} exports no op table (a build from before it): the build is stale. "
                           "Reinstall with `pip install --force-reinstall .` from the source tree.")
    for key, names in _TABLE_NEEDS.items():
        missing = [n for n in names if n not in table.get(key, {})]
        if missing:
            raise RuntimeError(f"whymatch.{name}'s op table lacks {key} {missing}: it was built from other sources "
                               "than this Python package; reinstall with `pip install --force-reinstall .`")
    codes = [table["dtype_codes"][n] for n in _TABLE_NEEDS["dtype_codes"]]
    if len(set(codes)) != len(codes):
        raise RuntimeError(f"whymatch.{name}'s op table gives two dtypes one code: {table['dtype_codes']}")
    if _table is not None and table != _table:
        raise RuntimeError(f"whymatch.{name}'s op table {table} differs from the other compiled module's {_table}: "
                           "they were built from different sources; reinstall with `pip install --force-reinstall .`")
    if _table is None:
        _table = table


def _load(name: str) -> ModuleType | None:
    if name in _cache:
        return _cache[name]
    try:
        mod = importlib.import_module(f"whymatch.{name}")
    except ImportError as exc:
        _import_errors[name] = str(exc)
        mod = None
    if mod is not None and getattr(mod, "__version__", None) != __version__:
        raise RuntimeError(
            f"whymatch.{name} was compiled for whymatch {getattr(mod, '__version__', '?')} but the Python "
            f"package is {__version__}: the build is stale. Reinstall with `pip install --force-reinstall .` "
            "from the source tree."
        )
    if mod is not None:
        _check_table(name, mod)
    _cache[name] = mod
    return mod


def cpu_module() -> ModuleType | None:
    return _load("_C")


def cuda_module() -> ModuleType | None:
    return _load("_C_cuda")


def op_table() -> dict | None:
    """The compiled modules' op table (csrc/op_table.h: "ops", "dtype_codes", "limits",
    "avsl_workspace"), checked against what the Python side needs; None when nothing was compiled."""
    for loader in (cpu_module, cuda_module):
        try:
            loader()
        except RuntimeError:  # a stale build: its calls say so
            pass
    return _table


def _constants() -> tuple[dict, int | None, dict, dict]:
    table = op_table()
    if table is None:  # no kernels: nothing reads the codes, and the reference takes any number of levels
        return dict.fromkeys((torch.float32, torch.float16, torch.bfloat16)), None, {"avsl_max_levels": 1 << 31}, {}
    c = table["dtype_codes"]
    return ({torch.float32: c["float32"], torch.float16: c["float16"], torch.bfloat16: c["bfloat16"]},
            c["float64"], dict(table["limits"]), dict(table["avsl_workspace"]))


#: The kernels' dtype codes (the op table's), of the dtypes every kernel takes; FLOAT64_CODE is the
#: code of the ops that also take float64 (for gradcheck). LIMITS: the kernels' limits
#: ("avsl_max_levels"); AVSL_WORKSPACE: the kernel codes of avsl_workspace_bytes.
DTYPE_CODES, FLOAT64_CODE, LIMITS, AVSL_WORKSPACE = _constants()


@contextlib.contextmanager
def emulate_cuda_on_cpu(module: ModuleType):
    """For the emulation tests only (tests/test_emulated_*.py): while active, the ops run on CPU
    tensors through ``module``, a host emulation of ``_C_cuda`` (tests/cuda_emulation/ compiles the
    real .cu files for the host), with everything the ops do for a CUDA launch (the CUDA kernels'
    argument layouts and workspaces, the checks the CUDA kernels leave to Python, a null stream).
    Not thread-safe and not for production: it swaps the CPU kernels of the whole process."""
    global _emulated_cuda
    if getattr(module, "__version__", None) != __version__:
        raise RuntimeError(f"the emulated CUDA module was compiled for whymatch {getattr(module, '__version__', '?')} "
                           f"but the Python package is {__version__}")
    if _emulated_cuda is not None:
        raise RuntimeError("emulate_cuda_on_cpu is already active")
    if getattr(module, "table", None) != op_table():
        raise RuntimeError(f"the emulated CUDA module's op table {getattr(module, 'table', None)} differs from the "
                           f"compiled modules' {op_table()}: rebuild it from these sources")
    _emulated_cuda = module
    try:
        yield module
    finally:
        _emulated_cuda = None


def cuda_limits(t: torch.Tensor) -> tuple[tuple[int, int], int]:
    """(compute capability, opt-in shared memory bytes per block) of the device the CUDA kernels run
    on for t; the host emulation counts as an sm_90 with its 227 KiB."""
    if t.device.type != "cuda":
        return (9, 0), 227 * 1024
    cap = tuple(torch.cuda.get_device_capability(t.device))
    # the opt-in limit from torch, else by compute capability (CUDA programming guide's table)
    optin = int(getattr(torch.cuda.get_device_properties(t.device), "shared_memory_per_block_optin", 0)) or \
        {(8, 0): 163 * 1024, (8, 7): 163 * 1024, (9, 0): 227 * 1024}.get(cap, 99 * 1024)
    return cap, optin


def import_error(name: str) -> str | None:
    _load(name)
    return _import_errors.get(name)


def module_for(device: torch.device, op: str) -> ModuleType | None:
    """The compiled module that runs ``op`` on ``device``, or None (reference fallback, warned once)."""
    if device.type == "cpu" and _emulated_cuda is not None:
        mod, name = _emulated_cuda, "_C_cuda (host emulation)"
    elif device.type == "cpu":
        mod, name = cpu_module(), "_C"
    elif device.type == "cuda":
        mod, name = cuda_module(), "_C_cuda"
    else:
        mod, name = None, f"a kernel for device type {device.type!r}"
    missing_op = mod is not None and not hasattr(mod, op)
    if missing_op:  # a module built before this op existed (same version string): use the reference
        name, mod = f"{name}.{op}", None
    if mod is None and name not in _warned:
        _warned.add(name)
        why = ("the installed module predates this op: reinstall with `pip install --force-reinstall .`"
               if missing_op else _import_errors.get(name, "it was not compiled"))
        warnings.warn(
            f"whymatch: no compiled kernels for {device.type} ({name}: {why}); running the pure-PyTorch "
            "reference implementation instead, which is slower and uses more memory. "
            "See whymatch.build_info().",
            RuntimeWarning,
            stacklevel=3,
        )
    return mod


_CPU, _CUDA = torch.device("cpu"), torch.device("cuda")


def _compiled(loader) -> bool:
    """Whether a compiled module is there to register kernels for (a stale build counts: each call
    then raises the stale-build error, as before)."""
    try:
        return loader() is not None
    except RuntimeError:
        return True


def register_kernels(op, entry: str, *, cpu, cuda, fallback) -> None:
    """Register op's compiled kernels with the dispatcher, one per device type, for each compiled
    module that loads: ``cpu(mod, *args)`` for "cpu" (``_C``), ``cuda(mod, *args)`` for "cuda"
    (``_C_cuda``). ``entry`` is the compiled function they launch. op's own body (the default, for
    a device without a registered kernel) is the reference ``fallback(*args)``, warned once.

    This is the one place that consults the host emulation of CUDA (emulate_cuda_on_cpu): the CPU
    registration runs the CUDA launch, through the emulated module, on CPU tensors. A module that
    lacks ``entry`` (built before it existed) or is missing at the call (tests) falls back too.
    """
    def cpu_kernel(*args):
        mod = module_for(_CPU, entry)  # (the emulated module while emulate_cuda_on_cpu is active)
        if mod is None:
            return fallback(*args)
        return (cpu if _emulated_cuda is None else cuda)(mod, *args)

    def cuda_kernel(*args):
        mod = module_for(_CUDA, entry)
        return fallback(*args) if mod is None else cuda(mod, *args)

    if _compiled(cpu_module):
        op.register_kernel("cpu")(cpu_kernel)
    if _compiled(cuda_module):
        op.register_kernel("cuda")(cuda_kernel)


def no_kernel(entry: str, device: torch.device) -> None:
    """An op's default body, where no compiled kernel was registered for device: the warning (once)."""
    module_for(device, entry)


#: False sends every public call through the dispatcher (for benchmarks/contention_cpu.py's per-layer
#: times and the tests that compare both routes).
direct_cpu = True


def eager_cpu(*tensors: torch.Tensor) -> bool:
    """Whether a public op function may launch its CPU kernel itself, skipping the torch.library
    dispatcher (tens of microseconds a call: the custom op's autograd and ADInplaceOrView layers,
    schema defaults, redispatch) for exactly what the registered op would run.

    True only in plain eager mode on plain CPU tensors: no torch.compile tracing, no Python dispatch or
    torch-function mode (FakeTensorMode, a recorder, ...), no functorch transform (vmap, grad,
    functionalize), no profiler (which should see the op), no input that needs a gradient (the
    registered op decides what that means), no emulated CUDA module, and the compiled CPU module
    present. Everything else goes through ``torch.ops.whymatch.*``. The public functions check their
    arguments before asking, so the kernel gets what the registered op's own checks guarantee.
    """
    if not direct_cpu or torch.compiler.is_compiling() or _emulated_cuda is not None:
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._functorch.maybe_current_level() is not None or \
            torch._C._is_torch_function_mode_enabled() or torch._C._autograd._profiler_enabled():
        return False
    if tensors[0].device.type != "cpu":  # (the public functions checked that all are on one device)
        return False
    for t in tensors:
        if type(t) is not torch.Tensor:
            return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t.requires_grad:
                return False
    return cpu_module() is not None


_num_threads: int | None = None  # None: torch.get_num_threads() at each call


def set_num_threads(n: int | None) -> None:
    """The CPU kernels' thread count (the caller's thread plus n - 1 threads of whymatch's one
    persistent pool); None (the default) follows torch.get_num_threads() at each call."""
    global _num_threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise TypeError(f"n must be an int or None, got {type(n).__name__}")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1 or None, got {n}")
    _num_threads = n


def get_num_threads() -> int:
    """The thread count the CPU kernels use now (set_num_threads, else torch.get_num_threads())."""
    return torch.get_num_threads() if _num_threads is None else _num_threads


def extra_arg(t: torch.Tensor) -> int:
    """The kernels' last argument: thread count on CPU, the current stream on CUDA."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    if _emulated_cuda is not None:
        return 0  # the null stream (the emulation runs synchronously)
    return torch.get_num_threads() if _num_threads is None else _num_threads


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr() if t.numel() > 0 else 0


def buf(t: torch.Tensor) -> tuple[int, int]:
    """A tensor as the compiled entries take a buffer: (address, bytes); an empty tensor is the absent
    buffer (0, 0), as :func:`no_buf`. The entries check the bytes against what the kernel will touch;
    t must be dense (contiguous or channels_last)."""
    n = t.numel()
    if n and t.is_contiguous():  # the common case first: it is called for every buffer of every launch
        return (t.data_ptr(), n * t.element_size())
    if n == 0:
        return (0, 0)
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    if not dense:
        raise ValueError(f"a buffer handed to the kernels must be dense, got shape {tuple(t.shape)} strides "
                         f"{t.stride()}")
    return (t.data_ptr(), t.numel() * t.element_size())


def no_buf() -> tuple[int, int]:
    """An absent optional buffer."""
    return (0, 0)


class OutputTooLargeError(ValueError):
    """An op's output (or workspace) would not fit: its size overflows int64 or exceeds the device memory."""


_phys_bytes: int | None = None


def _memory_limit(device: torch.device) -> int:
    """The most bytes one output may take on device: WHYMATCH_MAX_OUTPUT_BYTES, else the device's memory."""
    global _phys_bytes
    env = os.environ.get("WHYMATCH_MAX_OUTPUT_BYTES", "").strip()
    if env:
        try:
            v = int(env)
        except ValueError:
            raise ValueError(f"WHYMATCH_MAX_OUTPUT_BYTES must be an integer number of bytes, got {env!r}") from None
        if v <= 0:
            raise ValueError(f"WHYMATCH_MAX_OUTPUT_BYTES must be > 0, got {v}")
        return v
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        if _phys_bytes is None:
            try:
                _phys_bytes = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
            except (ValueError, OSError, AttributeError):
                _phys_bytes = 1 << 40
        return _phys_bytes
    return 1 << 62  # meta and others: no memory is taken; only the int64 bound applies


def check_size(op: str, name: str, shape, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse an output/workspace of `shape` and `dtype` on `device` that overflows int64 or exceeds the
    memory limit, with an error naming op and name (before the allocator is asked)."""
    numel = 1
    for d in shape:
        d = int(d)
        if d < 0:
            raise ValueError(f"{op}: {name} would have a negative size in shape {tuple(int(v) for v in shape)}")
        numel *= d
    shown = tuple(int(v) for v in shape)
    if numel > 2 ** 63 - 1:
        raise OutputTooLargeError(f"{op}: {name} of shape {shown} would hold {numel} elements, more than int64 "
                                  "can count")
    itemsize = dtype.itemsize
    nbytes = numel * itemsize
    limit = _memory_limit(torch.device(device))
    if nbytes > limit:
        raise OutputTooLargeError(f"{op}: {name} of shape {shown} ({str(dtype).replace('torch.', '')}) would take "
                                  f"{nbytes} bytes, more than the {limit} bytes available on {device} "
                                  "(WHYMATCH_MAX_OUTPUT_BYTES overrides)")


def empty(op: str, name: str, shape, *, dtype: torch.dtype, device: torch.device,
          memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """torch.empty after check_size; an allocator failure becomes a RuntimeError naming op and name."""
    check_size(op, name, shape, dtype, device)
    try:
        return torch.empty(tuple(int(v) for v in shape), dtype=dtype, device=device, memory_format=memory_format)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(f"{op}: could not allocate {name} of shape {tuple(int(v) for v in shape)} on {device}: "
                           f"{first}") from None


def dtype_code(t: torch.Tensor) -> int:
    """The kernels' code for t's dtype (float32, float16, bfloat16, float64)."""
    return FLOAT64_CODE if t.dtype == torch.float64 else DTYPE_CODES[t.dtype]


def device_guard(t: torch.Tensor):
    """Makes t's CUDA device current for a launch (a no-op on the CPU)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def refuse_double_backward(backward_op: str, forward_op: str) -> None:
    """Register an autograd formula for ``backward_op`` that refuses a second derivative by name.

    The fused backward kernels have no derivative of their own; without this, a double
    backward through them fails with torch's generic "no autograd kernel" message.
    """
    def _refuse(ctx, *grads):
        raise RuntimeError(f"{forward_op} does not support double backward (its backward is a fused kernel "
                           f"without a derivative); compute the loss without create_graph through {forward_op}")

    torch.library.register_autograd(backward_op, _refuse, setup_context=lambda ctx, inputs, output: None)
