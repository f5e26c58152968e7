"""Rewrites each CUDA launch `kernel<<<grid, block[, shmem[, stream]]>>>(args)` of a .cu file into
`emu::launch(emu::Cfg(grid, block, ...), kernel, args)`, so a host compiler can build it against
include/cuda_runtime.h (the emulated runtime). Usage: translate.py IN.cu OUT.cpp"""

import sys


def _kernel_start(src: str, j: int) -> int:
    """Where the kernel expression ending at j begins: identifier characters, '::' and a balanced <...>."""
    k, depth = j, 0
    while k > 0:
        c = src[k - 1]
        if c == ">":
            depth += 1
        elif c == "<":
            depth -= 1
        elif depth == 0 and not (c.isalnum() or c in "_:"):
            break
        k -= 1
    return k


def _closing_paren(src: str, p: int) -> int:
    depth = 0
    for q in range(p, len(src)):
        depth += {"(": 1, ")": -1}.get(src[q], 0)
        if depth == 0:
            return q
    raise ValueError("unbalanced parentheses after a launch")


def translate(src: str) -> str:
    out, i = [], 0
    while (j := src.find("<<<", i)) >= 0:
        k = _kernel_start(src, j)
        e = src.find(">>>", j)
        cfg = src[j + 3:e].split(",")
        if len(cfg) == 4:  # the stream: any handle type, passed as void*
            cfg[3] = f" (void*)({cfg[3]})"
        p = src.index("(", e)
        q = _closing_paren(src, p)
        args = src[p + 1:q]
        out.append(src[i:k])
        out.append(f"emu::launch(emu::Cfg({','.join(cfg)}), {src[k:j]}" + (f", {args}" if args.strip() else "") + ")")
        i = q + 1
    out.append(src[i:])
    return "".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        text = translate(f.read())
    with open(sys.argv[2], "w") as f:
        f.write(text)
