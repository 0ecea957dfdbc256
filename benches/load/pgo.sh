#!/usr/bin/env bash
# Builds fairway with profile-guided optimization (PGO), into target/pgo/release/fairway.
#
# 1. An instrumented release build (`-Cprofile-generate`), in target/pgo-gen.
# 2. It serves one short round of the load comparison's scenarios (compare.py, fairway only):
#    small and 16 KiB GETs, `Connection: close`, HTTP/2, 1,000 connections, compressed
#    answers, and 256 MiB uploaded and downloaded. Each process writes its counts as it exits.
# 3. `llvm-profdata` (rustup's llvm-tools, which match rustc's LLVM) merges them.
# 4. The release build again, with the profile (`-Cprofile-use`), in target/pgo.
#
# The profile belongs to the source it was made from: run this again after a change. Paths
# the training does not take (TLS, chunked uploads) are optimized as rarely run code.
# Needs what compare.py needs (nginx, wrk, h2load, curl; see benches/load/README.md).
# Usage: benches/load/pgo.sh [extra compare.py arguments]
set -euo pipefail
cd "$(dirname "$0")/../.."

rustup component add llvm-tools >/dev/null
sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$sysroot/lib/rustlib/$host/bin/llvm-profdata"

profiles="$PWD/target/pgo-profiles"
rm -rf "$profiles"
mkdir -p "$profiles"

echo "pgo: instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$profiles" \
    cargo build --release --locked --target-dir target/pgo-gen

echo "pgo: training run" >&2
python3 benches/load/compare.py --fairway target/pgo-gen/release/fairway --only fairway \
    --rounds 1 --duration 3 \
    --scenarios small-c64,small-c256,16k-c64,close-c64,h2-c8x8,conns-1000 \
    --compression --big --big-size 256MiB --out "$profiles/training.json" "$@" >&2

"$profdata" merge -o "$profiles/fairway.profdata" "$profiles"/*.profraw

echo "pgo: optimized build" >&2
RUSTFLAGS="-Cprofile-use=$profiles/fairway.profdata" \
    cargo build --release --locked --target-dir target/pgo

echo target/pgo/release/fairway
