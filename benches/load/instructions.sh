#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: fairway's own work in
# user space (kernel time is not counted), the same whatever else the machine is doing, so
# two builds can be compared without interleaved rounds. See benches/load/README.md,
# "Instructions per request".
#
#   benches/load/instructions.sh                 # build with debug info, profile, print
#   FAIRWAY=/path/to/fairway benches/load/instructions.sh   # an existing binary instead
#   SECONDS_MEASURED=8 CONNS=64 BASE_PORT=29000 OUT=/tmp/x benches/load/instructions.sh
#   LOCKED=1 benches/load/instructions.sh        # also the locked instructions per request
#
# Needs valgrind, nginx and wrk (Debian: apt-get install valgrind nginx wrk). All traffic
# stays on 127.0.0.1: BASE_PORT+1..+3 (backend), +30 (fairway), +31 (its admin listener).
set -euo pipefail

cd "$(dirname "$0")/../.."
base=${BASE_PORT:-29000}
measured=${SECONDS_MEASURED:-8}
conns=${CONNS:-64}
out=${OUT:-/tmp/fairway-callgrind-$(date -u +%Y%m%dT%H%M%S)}
for tool in valgrind callgrind_control callgrind_annotate nginx wrk curl; do
    command -v "$tool" > /dev/null || { echo "missing: $tool" >&2; exit 2; }
done

if [[ -z "${FAIRWAY:-}" ]]; then
    # Symbols and line tables, in a target directory of its own so that the release build
    # users run is left as it is.
    CARGO_PROFILE_RELEASE_DEBUG=1 CARGO_PROFILE_RELEASE_STRIP=none \
        cargo build --release --target-dir target/callgrind >&2
    FAIRWAY=target/callgrind/release/fairway
fi

dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
    wait 2> /dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM

cat > "$dir/nginx.conf" << EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:$((base + 1)); location / { add_header X-Upstream b1; return 200 "ok\n"; } }
    server { listen 127.0.0.1:$((base + 2)); location / { add_header X-Upstream b2; return 200 "ok\n"; } }
    server { listen 127.0.0.1:$((base + 3)); location / { add_header X-Upstream b3; return 200 "ok\n"; } }
}
EOF
cat > "$dir/fairway.toml" << EOF
[server]
listen = "127.0.0.1:$((base + 30))"

[admin]
listen = "127.0.0.1:$((base + 31))"

[upstreams.app]
balance = "round_robin"
servers = ["127.0.0.1:$((base + 1))", "127.0.0.1:$((base + 2))", "127.0.0.1:$((base + 3))"]

[upstreams.app.health_check]
path = "/"
interval = "2s"
EOF

nginx -p "$dir/" -c "$dir/nginx.conf" > /dev/null 2>&1 &
pids+=($!)
# With LOCKED=1 the dump keeps each instruction's count, for benches/load/locked.py.
dump_opts=(--dump-instr=no)
if [[ -n "${LOCKED:-}" ]]; then
    dump_opts=(--dump-instr=yes --compress-pos=no --compress-strings=no)
fi
RUST_LOG=warn valgrind --tool=callgrind "${dump_opts[@]}" --callgrind-out-file="$out" \
    "$FAIRWAY" -c "$dir/fairway.toml" > "$dir/fairway.log" 2>&1 &
fw=$!
pids+=($fw)
url="http://127.0.0.1:$((base + 30))/"
for _ in $(seq 1 100); do
    curl -sf -m 1 "$url" > /dev/null && break
    sleep 0.2
done
curl -sf -m 1 "$url" > /dev/null || { echo "fairway did not answer; its log:" >&2; cat "$dir/fairway.log" >&2; exit 2; }

# Warm-up (pool, spare buffers, page faults), not counted.
wrk -t1 -c"$conns" -d3s "$url" > /dev/null
callgrind_control -z "$fw" > /dev/null 2>&1
wrk -t1 -c"$conns" -d"${measured}s" "$url" > "$dir/wrk.txt"
callgrind_control -d "$fw" > /dev/null 2>&1
requests=$(awk '/requests in/ {print $1}' "$dir/wrk.txt")
dump=$(ls -t "$out".* | head -1)
total=$(callgrind_annotate --threshold=100 "$dump" 2> /dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "requests: $requests"
echo "instructions: $total"
echo "instructions per request: $((total / requests))"
echo "callgrind data: $dump (callgrind_annotate --inclusive=yes $dump)"
echo
echo "Inclusive instructions per request, top functions:"
callgrind_annotate --threshold=100 --inclusive=yes "$dump" 2> /dev/null |
    awk -v n="$requests" '/^ *[0-9,]+ \( *[0-9.]+%\)/ && !/PROGRAM TOTALS/ {
        line = $0
        match(line, /^ *[0-9,]+/)
        c = substr(line, RSTART, RLENGTH)
        gsub(/[ ,]/, "", c)
        sub(/^ *[0-9,]+ \( *[0-9.]+%\) */, "", line)
        sub(/ *\[[^]]*\] *$/, "", line)
        sub(/.*\/registry\/src\/[^\/]*\//, "", line)
        sub(/^\/rustc\/[0-9a-f]*\/library\//, "", line)
        printf "%8d  %s\n", c / n, line }' |
    grep -v -e 'thread_start' -e 'start_thread' -e 'clone' -e 'call_once' -e '__rust_begin_short_backtrace' |
    head -40 || true  # head closing the pipe early is no failure
if [[ -n "${LOCKED:-}" ]]; then
    echo
    python3 benches/load/locked.py "$dump" "$FAIRWAY" "$requests"
fi
