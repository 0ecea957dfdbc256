#!/usr/bin/env python3
"""The code a request runs through, as cache lines: how many distinct 64-byte lines of a
binary's code the instructions executed per request sit on, in all and per function. A
request that touches more lines than the first-level instruction cache holds (32 KiB, 512
lines) fetches them again from the next level each time; fewer lines, or hot code packed
tighter, cost less.

An instruction counts as run per request when callgrind counted it at least THRESHOLD times
the requests (default 0.3: the code of nearly every request, not of one in ten). "Density" is
the bytes of those instructions over the bytes of the lines they sit on: 1.0 when hot code
fills its lines, lower when cold code (error paths, rare branches) sits between.

It reads a callgrind dump made with `--dump-instr=yes --compress-pos=no
--compress-strings=no` (`LOCKED=1 benches/load/instructions.sh` makes one) and the binary's
disassembly (`objdump -d -C`). Standard library only. It works on any binary with symbols,
Nginx's as well, for a comparison.

    python3 benches/load/footprint.py DUMP BINARY REQUESTS [THRESHOLD] [TOP]
"""

import collections
import sys

from locked import disassembly, executed

LINE = 64


def instructions(binary):
    """Address → (size in bytes, function) of every instruction in `binary`'s code."""
    found = sorted((addr, function) for addr, function, _ in disassembly(binary))
    # An instruction's size is the distance to the next one (the last of the code is left
    # out: it is no request's).
    return {a: (b - a, f) for (a, f), (b, _) in zip(found, found[1:])}


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    dump, binary, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
    threshold = float(sys.argv[4]) if len(sys.argv) > 4 else 0.3
    top = int(sys.argv[5]) if len(sys.argv) > 5 else 30
    counts = executed(dump, binary.rsplit("/", 1)[-1])
    code = instructions(binary)
    hot = [a for a, n in counts.items() if n >= threshold * requests and a in code]
    lines, size = set(), 0
    per_function = collections.defaultdict(lambda: [0, set(), 0])
    for a in hot:
        n, function = code[a]
        first, last = a // LINE, (a + n - 1) // LINE
        lines.update(range(first, last + 1))
        size += n
        f = per_function[function]
        f[0] += n
        f[1].update(range(first, last + 1))
        f[2] += counts[a]
    print("instructions run per request: %d at %d bytes, on %d lines (%.1f KiB), density %.2f"
          % (len(hot), size, len(lines), len(lines) * LINE / 1024,
             size / max(1, len(lines) * LINE)))
    print("%6s %7s %7s %9s  %s" % ("lines", "bytes", "density", "runs/req", "function"))
    ranked = sorted(per_function.items(), key=lambda kv: -len(kv[1][1]))
    for function, (n, ls, runs) in ranked[:top]:
        print("%6d %7d %7.2f %9.0f  %s" % (len(ls), n, n / (len(ls) * LINE), runs / requests,
                                           function[:110]))


if __name__ == "__main__":
    main()
