"""Build the host emulation of whymatch's CUDA module: the checkout's csrc/*/*_cuda.cu and
csrc/bindings_cuda.cpp, compiled with g++ against emu_cuda.h / emu_runtime.cpp into a Python
extension module ``_C_cuda`` that runs the kernels on CPU memory.

    python tests/cuda_emulation/build.py [--variant fiber|threads|asan] [--src DIR]   # prints the .so

What the CMake build decides is read from CMakeLists.txt, not repeated here: the sources of
target _C_cuda (its pybind11_add_module line and the GLOB of WHYMATCH_CUDA_SOURCES), its include
directories and its compile definitions (target_compile_definitions(_C_cuda ...), with
${WHYMATCH_VERSION} taken from python/whymatch/_version.py the way CMakeLists.txt does, and the
two values that only nvcc knows, the architectures and the compiler version, set to "emu-host").
A CMakeLists.txt that this parser does not understand fails the build with the line it could not
read. (The cmake file API would give the same facts, but needs a configure run with nvcc, ~10 s,
for three lines of text.)

Caching (under $WHYMATCH_EMU_CACHE, default build/cuda_emulation/): every object file under
objects/ by a hash of its source, of every header under csrc/, of the emulation files, flags and
toolchain; the module under <variant>-<hash>/ by the hash of its objects. An edited kernel rebuilds one
object and relinks (seconds); an unchanged checkout rebuilds nothing. Objects compile in parallel
(one process per core). A lock file serializes concurrent builds (pytest-xdist, two sessions).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import fcntl
import glob
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CUDA_HOME = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")
EMU_FILES = ("emu_cuda.h", "emu_wmma.h", "emu_runtime.cpp", "rewrite.py", "build.py")  # selftest.cu is not part of the module

COMMON = ["-std=c++17", "-fPIC", "-pthread", "-fvisibility=hidden", "-fno-gnu-unique", "-Wall",
          "-Wno-unknown-pragmas", "-Wno-attributes", "-Wno-unused-parameter", "-Wno-unused-function"]
VARIANTS = {
    # fibers: the default back end, fast and deterministic
    "fiber": ["-O1"],
    # one OS thread per CUDA thread
    "threads": ["-O1", "-DEMU_OS_THREADS"],
    # OS threads under AddressSanitizer (ASan follows std::thread, not ucontext fibers); load with
    # LD_PRELOAD=$(g++ -print-file-name=libasan.so)
    "asan": ["-O1", "-g", "-DEMU_OS_THREADS", "-fsanitize=address", "-fno-omit-frame-pointer"],
}
LINK = {"asan": ["-fsanitize=address"]}


def cuda_include() -> Path:
    return CUDA_HOME / "include"


def headers_present() -> bool:
    """The emulation compiles against the real CUDA headers (types and host conversions)."""
    return (cuda_include() / "cuda_runtime.h").is_file()


# --------------------------------------------------------------------------------------------
# What CMakeLists.txt says about target _C_cuda
# --------------------------------------------------------------------------------------------
@dataclass
class CMakeTarget:
    binding: str                     # csrc/bindings_cuda.cpp
    source_glob: str                 # csrc/*/*_cuda.cu
    include_dirs: list[str] = field(default_factory=list)
    definitions: list[str] = field(default_factory=list)  # NAME=VALUE, VALUE as the C preprocessor sees it


def _call(text: str, command: str, first: str) -> str:
    m = re.search(rf"{command}\(\s*{re.escape(first)}\b(.*?)\)\s*$", text, re.S | re.M)
    if not m:
        raise RuntimeError(f"CMakeLists.txt: no {command}({first} ...) for the emulation to read")
    return m.group(1)


def _expand(value: str, variables: dict[str, str], where: str) -> str:
    def sub(m):
        if m.group(1) not in variables:
            raise RuntimeError(f"CMakeLists.txt: {where} uses ${{{m.group(1)}}}, which the emulation build does not "
                               f"know (known: {', '.join(sorted(variables))}); teach tests/cuda_emulation/build.py")
        return variables[m.group(1)]
    return re.sub(r"\$\{(\w+)\}", sub, value)


def read_cmake(repo: Path = REPO) -> CMakeTarget:
    text = (repo / "CMakeLists.txt").read_text()
    version = re.search(r'__version__ = "([^"]+)"', (repo / "python/whymatch/_version.py").read_text())
    if not version:
        raise RuntimeError("python/whymatch/_version.py: no __version__")
    variables = {"WHYMATCH_VERSION": version.group(1), "_archs": "emu-host", "CMAKE_CUDA_COMPILER_VERSION": "emu-host",
                 "CMAKE_CURRENT_SOURCE_DIR": ""}
    add = _call(text, "pybind11_add_module", "_C_cuda").split()
    binding = next((a for a in add if a.endswith(".cpp")), None)
    globs = re.search(r"file\(GLOB\s+WHYMATCH_CUDA_SOURCES\s+(?:CONFIGURE_DEPENDS\s+)?\"([^\"]+)\"\)", text)
    if not binding or not globs or "${WHYMATCH_CUDA_SOURCES}" not in add:
        raise RuntimeError("CMakeLists.txt: cannot read the sources of _C_cuda (pybind11_add_module(_C_cuda ...) "
                           "with a .cpp and ${WHYMATCH_CUDA_SOURCES}, file(GLOB WHYMATCH_CUDA_SOURCES ...))")
    incs = _call(text, "target_include_directories", "_C_cuda").split()
    defs_text = _call(text, "target_compile_definitions", "_C_cuda")
    defs = []
    for tok in re.findall(r'[A-Za-z_]\w*(?:="(?:[^"\\]|\\.)*"|=\S+)?', defs_text):
        if tok in ("PRIVATE", "PUBLIC", "INTERFACE"):
            continue
        defs.append(_expand(tok, variables, "target_compile_definitions(_C_cuda)"))
    return CMakeTarget(binding=binding, source_glob=_expand(globs.group(1), variables, "GLOB").lstrip("/"),
                       include_dirs=[i for i in incs if i not in ("PRIVATE", "PUBLIC", "INTERFACE")],
                       definitions=defs)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------
def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _toolchain_id(cxx: str) -> str:
    ver = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    rt = (cuda_include() / "cuda_runtime_api.h").read_bytes() if headers_present() else b""
    import pybind11
    return _sha(ver, rt, pybind11.__version__, sysconfig.get_config_var("EXT_SUFFIX") or "", sys.version)


def _compile(cxx: str, flags: list[str], src: Path, obj: Path) -> None:
    tmp = obj.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.o")
    r = subprocess.run([cxx, *flags, "-c", str(src), "-o", str(tmp)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"emulation build: {src.name} did not compile:\n{r.stderr[-6000:]}")
    os.replace(tmp, obj)


def build(variant: str = "fiber", src_root: Path | None = None, cache: Path | None = None,
          jobs: int | None = None, verbose: bool = False) -> Path:
    """Build (or find in the cache) the emulated ``_C_cuda`` of ``src_root`` (default: this checkout);
    returns the path of the extension module."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    if not headers_present():
        raise FileNotFoundError(f"the CUDA headers are absent ({cuda_include() / 'cuda_runtime.h'}); set CUDA_HOME")
    src_root = Path(src_root or REPO).resolve()
    cache = Path(cache or os.environ.get("WHYMATCH_EMU_CACHE") or REPO / "build" / "cuda_emulation")
    cxx = os.environ.get("CXX", "g++")
    import pybind11
    target = read_cmake(src_root)
    flags = [*COMMON, *VARIANTS[variant], "-include", str(HERE / "emu_cuda.h"), f"-I{HERE}", f"-I{cuda_include()}",
             *[f"-I{src_root / d}" for d in target.include_dirs], f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}", *[f"-D{d}" for d in target.definitions]]
    csrc = src_root / "csrc"
    headers = sorted(p for p in csrc.rglob("*") if p.is_file() and p.suffix in (".h", ".cuh", ".hpp", ".inl"))
    # flags name src_root; the hash must not, so that a mutant in a temp dir reuses unchanged objects
    flag_id = " ".join(flags).replace(str(src_root), "<src>")
    common_id = _sha(_toolchain_id(cxx), flag_id, *[(HERE / f).read_bytes() for f in EMU_FILES],
                     *[p.relative_to(csrc).as_posix().encode() + b"\n" + p.read_bytes() for p in headers])
    for h in headers:  # only the .cu files go through rewrite.py
        code = re.sub(r"//[^\n]*", "", h.read_text(errors="replace"))
        if "<<<" in code or "__shared__" in code:
            raise RuntimeError(f"{h}: a launch or a __shared__ declaration in a header, which the emulation does not "
                               "rewrite: keep them in the .cu files (or teach tests/cuda_emulation/rewrite.py)")
    kernels = sorted(Path(p) for p in glob.glob(str(src_root / target.source_glob)))
    if not kernels:
        raise RuntimeError(f"no CUDA sources match {target.source_glob} under {src_root}")
    units = [(k, True) for k in kernels] + [(src_root / target.binding, False), (HERE / "emu_runtime.cpp", False)]
    objdir = cache / "objects"
    objdir.mkdir(parents=True, exist_ok=True)
    todo, objs = [], []
    with tempfile.TemporaryDirectory(prefix="wm_emu_") as tmp:
        for src, is_cu in units:
            text = src.read_bytes()
            h = _sha(common_id, src.name, text)[:24]
            obj = objdir / f"{src.stem}-{variant}-{h}.o"
            objs.append(obj)
            if obj.exists():
                continue
            todo.append((src, is_cu, obj))
        if todo:
            def one(item):
                src, is_cu, obj = item
                unit = src
                if is_cu:
                    unit = Path(tmp) / f"{src.stem}.emu.cpp"
                    _rewrite_file(str(src), str(unit))
                _compile(cxx, flags, unit, obj)
                if verbose:
                    print(f"  compiled {src.name}", file=sys.stderr)
            with cf.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as ex:
                for f in [ex.submit(one, it) for it in todo]:
                    f.result()
    mod_hash = _sha(*[o.name for o in objs], " ".join(LINK.get(variant, [])))[:16]
    out_dir = cache / f"{variant}-{mod_hash}"
    so = out_dir / f"_C_cuda{sysconfig.get_config_var('EXT_SUFFIX')}"
    with _locked(cache / ".lock"):
        if not so.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp_so = so.with_name(so.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
            r = subprocess.run([cxx, "-shared", "-pthread", *LINK.get(variant, []), "-o", str(tmp_so),
                                *map(str, objs)], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"emulation build: link failed:\n{r.stderr[-6000:]}")
            os.replace(tmp_so, so)
    return so


def build_selftest(variant: str = "fiber", cache: Path | None = None) -> Path:
    """The planted-bug kernels of selftest.cu with the runtime, as a plain shared library (ctypes)."""
    if not headers_present():
        raise FileNotFoundError(f"the CUDA headers are absent ({cuda_include() / 'cuda_runtime.h'}); set CUDA_HOME")
    cache = Path(cache or os.environ.get("WHYMATCH_EMU_CACHE") or REPO / "build" / "cuda_emulation")
    cxx = os.environ.get("CXX", "g++")
    flags = [*COMMON, *VARIANTS[variant], "-include", str(HERE / "emu_cuda.h"), f"-I{HERE}", f"-I{cuda_include()}"]
    files = [*EMU_FILES, "selftest.cu"]
    h = _sha(_toolchain_id(cxx), " ".join(flags), *[(HERE / f).read_bytes() for f in files])[:16]
    so = cache / f"selftest-{variant}-{h}.so"
    with _locked(cache / ".lock"):
        if so.exists():
            return so
        with tempfile.TemporaryDirectory(prefix="wm_emu_") as tmp:
            unit = Path(tmp) / "selftest.emu.cpp"
            _rewrite_file(str(HERE / "selftest.cu"), str(unit))
            objs = []
            for src in (unit, HERE / "emu_runtime.cpp"):
                obj = Path(tmp) / (src.stem + ".o")
                _compile(cxx, flags, src, obj)
                objs.append(str(obj))
            tmp_so = Path(tmp) / so.name
            r = subprocess.run([cxx, "-shared", "-pthread", *LINK.get(variant, []), "-o", str(tmp_so), *objs],
                               capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"emulation selftest: link failed:\n{r.stderr[-6000:]}")
            shutil.move(str(tmp_so), so)
    return so


def _rewrite_file(inp: str, out: str) -> None:
    sys.path.insert(0, str(HERE))
    try:
        import rewrite as rw  # tests/cuda_emulation/rewrite.py
    finally:
        sys.path.remove(str(HERE))
    rw.rewrite_file(inp, out)


def load(so: Path, copy_to: Path | None = None):
    """Import the emulated module from ``so`` (not registered in sys.modules). With ``copy_to`` a
    copy of the file is imported: a second, independent instance (its own statics, e.g. settings
    that the kernels read once per process)."""
    so = Path(so)
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        dst = copy_to / so.name
        if not dst.exists():
            shutil.copyfile(so, dst)
        so = dst
    # the module's init function is PyInit__C_cuda: the last component of the name must be _C_cuda
    name = f"whymatch_cuda_emulation_{hashlib.sha1(str(so).encode()).hexdigest()[:8]}._C_cuda"
    loader = importlib.machinery.ExtensionFileLoader(name, str(so))
    spec = importlib.util.spec_from_file_location(name, str(so), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.__emulation_path__ = str(so)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="fiber", choices=sorted(VARIANTS))
    ap.add_argument("--src", type=Path, default=None, help="the source tree (default: this checkout)")
    ap.add_argument("-j", "--jobs", type=int, default=None)
    a = ap.parse_args()
    print(build(a.variant, a.src, jobs=a.jobs, verbose=True))


if __name__ == "__main__":
    main()
