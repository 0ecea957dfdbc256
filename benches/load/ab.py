#!/usr/bin/env python3
"""Two or more fairway builds (or settings) side by side, in one run: every variant is up at
once behind the same three static upstreams as compare.py, and short `wrk` runs go to each in
turn, the order rotated every round. A change's effect is read from the per-round ratios to
the first variant, which the machine's drift between rounds touches much less than the
medians. See README.md beside this file, "A/B of two builds".

    python3 benches/load/ab.py before=/tmp/fairway-old after=target/release/fairway
    python3 benches/load/ab.py --rounds 20 two=target/release/fairway \\
        one=target/release/fairway,TOKIO_WORKER_THREADS=1
    python3 benches/load/ab.py --path /16k --conns 256 a=BIN b=BIN
    python3 benches/load/ab.py --close a=BIN b=BIN

Each variant is NAME=BINARY, then optional ,KEY=VALUE environment settings. The setup
(backend, configs, /proc readers, cleanup) is compare.py's, imported.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as lc  # noqa: E402  (the load comparison: setup, configs, /proc readers)


def parse_args(argv):
    ap = argparse.ArgumentParser(description="fairway builds side by side (see README.md)")
    ap.add_argument("variants", nargs="+", metavar="NAME=BINARY[,KEY=VALUE...]",
                    help="the first is the reference of the ratios")
    ap.add_argument("--rounds", type=int, default=12, help="rounds (default 12)")
    ap.add_argument("--duration", type=int, default=2, help="seconds per wrk run (default 2)")
    ap.add_argument("--conns", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--path", default="/", help="request path: / or /16k (default /)")
    ap.add_argument("--close", action="store_true",
                    help="send Connection: close (one TCP connection per request)")
    ap.add_argument("--base-port", type=int, default=29100,
                    help="ports BASE+1..+4 (backend), BASE+30+2i and +31+2i (variant i)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    args = ap.parse_args(argv)
    variants = []
    for v in args.variants:
        name, eq, rest = v.partition("=")
        if not eq or not name or not rest:
            ap.error("a variant is NAME=BINARY[,KEY=VALUE...]: %r" % v)
        binary, *settings = rest.split(",")
        env = dict(s.partition("=")[::2] for s in settings)
        variants.append((name, binary, env))
    if len({n for n, _, _ in variants}) != len(variants):
        ap.error("variant names must differ")
    args.variants = variants
    return args


def main(argv):
    args = parse_args(argv)

    def body(session):
        tools, _, _ = lc.check_tools(args, [], [])
        run_dir, body16k = lc.make_run_dir()
        session.run_dir = run_dir
        ports = lc.Ports(args.base_port)
        mine = [args.base_port + 30 + k for k in range(2 * len(args.variants))]
        lc.check_ports_free(ports.backends + [ports.stub] + mine)
        backend, _ = lc.start_backend(session.children, tools, run_dir, ports, body16k)
        bench = lc.Bench(args, tools, run_dir, ports, backend, body16k)
        scen = {"conns": args.conns, "path": args.path, "close": args.close}
        proxies = []
        for i, (name, binary, env) in enumerate(args.variants):
            own = os.path.join(run_dir, "variant-%d" % i)
            os.mkdir(own)
            path, src, version = lc.prepare_fairway(binary, own)
            p = lc.Ports(args.base_port)
            p.fairway, p.fairway_admin = mine[2 * i], mine[2 * i + 1]
            conf = os.path.join(own, "fairway.toml")
            px = lc.Proxy(name, p.fairway, p.fairway, [path, "-c", conf], lc.fairway_conf(p),
                          conf, [path, "check", "-c", conf],
                          dict(os.environ, RUST_LOG="warn", **env))
            lc.write_and_check([px])
            lc.start_proxy(session.children, px, run_dir, "%s.log" % name, body16k)
            lc.run_wrk(tools, bench.lua, px.port, scen, 1)  # warm-up
            print("%-10s %s (%s)%s" % (name, version, src, "".join(
                " %s=%s" % kv for kv in env.items())))
            proxies.append(px)
        print("%d rounds x %d s, wrk -t1 -c%d %s%s\n" % (
            args.rounds, args.duration, args.conns, args.path,
            " (Connection: close)" if args.close else ""))
        runs = {px.name: [] for px in proxies}
        for r in range(args.rounds):
            for px in proxies[r % len(proxies):] + proxies[:r % len(proxies)]:
                pids = px.pids()
                c0 = lc.cpu_seconds(pids)
                res = lc.run_wrk(tools, bench.lua, px.port, scen, args.duration)
                c1 = lc.cpu_seconds(pids)
                if not res["ok"] or res["error_count"]:
                    print("[%d] %s: %s" % (r, px.name, res.get("error") or res["errors"]))
                    return 1
                runs[px.name].append({"rps": res["rps"], "p99": res["p99_ms"],
                                      "cpu": (c1 - c0) / res["requests"] * 1e5})
        ref = runs[proxies[0].name]
        print("| variant | req/s | CPU s/100k | p99 ms | req/s ÷ %s, per round | CPU ÷ %s |"
              % (proxies[0].name, proxies[0].name))
        print("|---|---:|---:|---:|---:|---:|")
        for px in proxies:
            mine_runs = runs[px.name]
            med = {k: statistics.median(x[k] for x in mine_runs) for k in ("rps", "cpu", "p99")}
            rr = [a["rps"] / b["rps"] for a, b in zip(mine_runs, ref)]
            cr = [a["cpu"] / b["cpu"] for a, b in zip(mine_runs, ref)]
            print("| %s | %.0f | %.3f | %.2f | %.3f (%.2f–%.2f) | %.3f (%.2f–%.2f) |" % (
                px.name, med["rps"], med["cpu"], med["p99"], statistics.median(rr), min(rr),
                max(rr), statistics.median(cr), min(cr), max(cr)))
        return 0

    return lc.run_session(args, body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
