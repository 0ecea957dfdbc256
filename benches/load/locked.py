#!/usr/bin/env python3
"""Locked instructions per request: how many `lock`-prefixed instructions (atomic adds,
compare-and-swaps, the lock and unlock of a mutex) and `xchg` with memory (locked without the
prefix) fairway executed per request, in all and per function.

It reads a callgrind dump made with `--dump-instr=yes --compress-pos=no
--compress-strings=no` (`LOCKED=1 benches/load/instructions.sh` makes one and runs this) and
the binary's disassembly (`objdump -d -C`), and adds up the execution counts of the locked
instructions. Standard library only.

    python3 benches/load/locked.py DUMP BINARY REQUESTS [TOP]
"""

import collections
import re
import subprocess
import sys


def executed(dump, binary_name):
    """Execution count per instruction address of the object named `binary_name`."""
    counts = collections.Counter()
    obj = None
    after_call = False
    # "positions: instr" or "positions: instr line": the columns before the count.
    positions = 1
    with open(dump) as f:
        for line in f:
            if line.startswith("positions:"):
                positions = len(line.split()) - 1
            elif line.startswith("ob="):
                obj = line[3:].strip()
            elif line.startswith("calls="):
                # The line after a call gives the call's inclusive cost, not an instruction's.
                after_call = True
                continue
            elif line.startswith("0x"):
                if not after_call and obj and obj.endswith("/" + binary_name):
                    fields = line.split()
                    counts[int(fields[0], 16)] += int(fields[positions])
            after_call = False
    return counts


def disassembly(binary):
    """(address, function, instruction text) of every instruction in `binary`'s code."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", binary],
                         check=True, capture_output=True, text=True).stdout
    function = None
    for line in out.splitlines():
        m = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if m:
            function = m.group(2)
            continue
        m = re.match(r"^\s+([0-9a-f]+):\s+(.*)$", line)
        if m:
            yield int(m.group(1), 16), function, m.group(2)


def locked(binary):
    """Address → function of every locked instruction in `binary`."""
    return {addr: function for addr, function, text in disassembly(binary)
            if re.search(r"\block\b", text) or re.search(r"\bxchg\w*\s.*\(", text)}


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    dump, binary, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 30
    counts = executed(dump, binary.rsplit("/", 1)[-1])
    per_function = collections.Counter()
    for addr, function in locked(binary).items():
        per_function[function] += counts.get(addr, 0)
    total = sum(per_function.values())
    print("locked instructions per request: %.1f" % (total / requests))
    for function, n in per_function.most_common(top):
        if n == 0:
            break
        print("%7.2f  %s" % (n / requests, function[:140]))


if __name__ == "__main__":
    main()
