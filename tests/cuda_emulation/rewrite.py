"""Rewrite the two CUDA constructs that no macro can express, and nothing else:

    KERNEL<<<grid, block[, smem[, stream]]>>>(args)  ->  ::emu::launch(KERNEL, grid, block, smem, stream)(args)
    extern __shared__ [__align__(N)] TYPE NAME[];    ->  a reference to the block's dynamic shared memory
    __shared__ [__align__(N)] TYPE NAME[D1]...;      ->  a static, registered with the runtime (poisoned)

Newlines inside a launch are kept, so line numbers in compiler messages match the original
file (a #line directive names it). The caller checks that nothing CUDA-only is left
(:func:`leftovers`), so that a construct these patterns miss fails the build loudly.
"""
from __future__ import annotations

import re
import sys

# The kernel name may be qualified and carry one level of template arguments, e.g. k<float>.
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:\s*<[^<>;(){}]*(?:<[^<>;(){}]*>[^<>;(){}]*)*>)?)\s*<<<(.*?)>>>", re.S)
DYN_SMEM = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:\s]*?)\s+"
    r"(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_]\w*)\s*\[\s*\]\s*;")

_DECL = r"[A-Za-z_]\w*(?:\s*\[[^\]]+\])*"
STATIC_SMEM = re.compile(
    r"__shared__\s+((?:__align__\s*\(\s*\d+\s*\)\s+)?)([A-Za-z_][\w:<>,\s]*?)\s+"
    rf"({_DECL}(?:\s*,\s*{_DECL})*)\s*;")


def _static(m: re.Match) -> str:
    align, ty = m.group(1).strip(), " ".join(m.group(2).split())
    out = []
    for decl in m.group(3).split(","):  # one or more declarators: NAME[D1][D2]...
        decl = decl.strip()
        name = re.match(r"[A-Za-z_]\w*", decl).group(0)
        dims = decl[len(name):]
        # the array and guard bytes after it, in one static: a write past the end shows
        store = f"wm_emu_smem_{name}"
        out.append(f"static struct {{ {align + ' ' if align else ''}{ty} a{dims}; unsigned char guard[64]; }} {store}; "
                   f"static auto& {name} = {store}.a; [[maybe_unused]] static const bool wm_emu_registered_{name} = "
                   f"::emu::register_shared(&{store}, sizeof({store}), sizeof({name}), \"{name}\");")
    return " ".join(out)


def _dyn(m: re.Match) -> str:
    ty, name = " ".join(m.group(1).split()), m.group(2)
    # a reference to the pointer, so that it follows the runtime's per-launch buffer (valid at
    # namespace scope and in a function)
    return f"static {ty}* const& {name} = reinterpret_cast<{ty}* const&>(::emu::g_dyn_smem);"


def rewrite(src: str) -> tuple[str, int, int]:
    """The rewritten source, the number of launches and of shared-memory declarations rewritten."""
    src, n_dyn = DYN_SMEM.subn(_dyn, src)
    src, n_static = STATIC_SMEM.subn(_static, src)
    src, n_launch = LAUNCH.subn(lambda m: f"::emu::launch({m.group(1)}, {m.group(2)})", src)
    return src, n_launch, n_dyn + n_static


def leftovers(src: str) -> list[str]:
    """CUDA-only syntax still present after :func:`rewrite` (each as 'line N: text')."""
    out = []
    for i, line in enumerate(src.splitlines(), 1):
        code = line.split("//", 1)[0]
        if "<<<" in code or ">>>" in code or "__shared__" in code:
            out.append(f"line {i}: {line.strip()}")
    return out


def rewrite_file(inp: str, out: str) -> tuple[int, int]:
    with open(inp, encoding="utf-8") as f:
        text, n_launch, n_dyn = rewrite(f.read())
    left = leftovers(text)
    if left:
        raise RuntimeError(f"{inp}: CUDA syntax that the emulation's rewrite does not handle: " + "; ".join(left))
    with open(out, "w", encoding="utf-8") as f:
        f.write(f'#line 1 "{inp}"\n' + text)
    return n_launch, n_dyn


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: rewrite.py IN.cu OUT.cpp")
    print("%d launches, %d shared-memory declarations" % rewrite_file(sys.argv[1], sys.argv[2]))  # noqa: UP031
