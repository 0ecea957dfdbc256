#!/usr/bin/env python3
"""Where the time goes: fairway, nginx and HAProxy under one fixed load, profiled.

Each proxy in turn, in front of the same three static upstreams as compare.py, under
`wrk -t1 -c64` (small GET, keep-alive). Per request it records the proxy's CPU (user and
system, per thread, from /proc), context switches, system calls by type (strace on a short
window, and perf's syscall tracepoints on a whole run), reads and writes per request and
the bytes they move, wake-ups, perf counters and the top symbols (perf record). Then a
1 MiB chunked upload sent as 1-byte chunks, with its CPU, system calls and top symbols.
Markdown tables on stdout, the raw numbers in a JSON file.

Python 3 standard library only; installs nothing; all traffic stays on 127.0.0.1. The
setup (backend, proxies and their configs, /proc readers, cleanup) is compare.py's,
imported. See README.md beside this file, "Profile (where the time goes)".
Exit status: 0 ok, 1 a run failed or saw request errors, 2 setup failure.
"""

import argparse
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as lc  # noqa: E402  (the load comparison: setup, configs, /proc readers)
from compare import HOST, SetupError, read_file  # noqa: E402

SCENARIO = "small-c64"  # compare.py's: GET / (3-byte body), 64 keep-alive connections
UPLOAD_PATH = "/buffered/upload"

READ_CALLS = {"read", "readv", "recvfrom", "recvmsg", "recvmmsg", "pread64", "preadv"}
WRITE_CALLS = {"write", "writev", "sendto", "sendmsg", "sendmmsg", "pwrite64", "pwritev",
               "sendfile", "splice"}
EPOLL_CALLS = {"epoll_wait", "epoll_pwait", "epoll_pwait2"}
# Counted with perf's tracepoints when strace is not there to say which calls occur.
DEFAULT_SYSCALLS = sorted(READ_CALLS | WRITE_CALLS | EPOLL_CALLS | {
    "epoll_ctl", "futex", "accept4", "accept", "close", "shutdown", "connect", "socket",
    "setsockopt", "getsockopt", "getsockname", "getpeername", "sched_yield", "madvise",
    "mmap", "munmap", "mprotect", "brk", "clock_nanosleep", "ioctl"})
# Kernel paths whose inclusive share of the samples (perf report --children) says where the
# kernel time goes. Kernel call chains are complete (the kernel keeps its own unwind
# tables), whatever the proxy's binary was built with. They nest, so they overlap.
KERNEL_PATHS = [
    ("system calls, all", "entry_SYSCALL_64_after_hwframe"),
    ("socket writes (tcp_sendmsg)", "tcp_sendmsg"),
    ("- the peer's receive, run by the writer (net_rx_action)", "net_rx_action"),
    ("- waking the peer (sock_def_readable)", "sock_def_readable"),
    ("socket reads (tcp_recvmsg)", "tcp_recvmsg"),
    ("epoll_wait (do_epoll_wait)", "do_epoll_wait"),
    ("futex (do_futex)", "do_futex"),
    ("eventfd writes (eventfd_write)", "eventfd_write"),
    ("context switches (__schedule)", "__schedule"),
]
COUNTERS = ["task-clock", "context-switches", "cpu-migrations", "page-faults", "cycles",
            "instructions"]


# --------------------------------------------------------------------------- /proc

def task_label(pid, tid, comm):
    """A thread's name; nginx's processes by the title nginx gives them."""
    if pid == tid:
        try:
            cmd = read_file("/proc/%d/cmdline" % pid).replace("\0", " ")
        except OSError:
            cmd = ""
        m = re.match(r"(nginx: \w+ process)", cmd)
        if m:
            return m.group(1)
    return comm


def task_snapshot(pids):
    """{tid: {pid, comm, user, sys, vcs, nvcs}} for every thread of the given processes,
    from /proc/PID/task/TID/stat (utime, stime) and .../status (context switches)."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for t in tids:
            base = "/proc/%d/task/%s/" % (pid, t)
            try:
                st, status = read_file(base + "stat"), read_file(base + "status")
            except OSError:
                continue
            f = st[st.rfind(")") + 2:].split()
            cs = dict(line.split(":", 1) for line in status.splitlines()
                      if line.endswith(tuple("0123456789")) and "ctxt_switches" in line)
            out[int(t)] = {"pid": pid, "comm": st[st.find("(") + 1:st.rfind(")")],
                           "user": int(f[11]) / lc.CLK_TCK, "sys": int(f[12]) / lc.CLK_TCK,
                           "vcs": int(cs.get("voluntary_ctxt_switches", 0)),
                           "nvcs": int(cs.get("nonvoluntary_ctxt_switches", 0))}
    return out


def task_delta(before, after):
    """Per thread: CPU seconds and context switches between two snapshots. A thread born in
    between counts from zero; one that ended in between is lost (its process's totals in
    /proc/PID/stat still have it)."""
    rows = []
    for tid in sorted(after):
        a = after[tid]
        b = before.get(tid, {"user": 0, "sys": 0, "vcs": 0, "nvcs": 0})
        rows.append({"pid": a["pid"], "tid": tid,
                     "label": task_label(a["pid"], tid, a["comm"]),
                     "user_s": a["user"] - b["user"], "sys_s": a["sys"] - b["sys"],
                     "vcs": a["vcs"] - b["vcs"], "nvcs": a["nvcs"] - b["nvcs"]})
    seen = {}
    for r in rows:  # same name twice: numbered in thread-id order
        seen[r["label"]] = seen.get(r["label"], 0) + 1
        if seen[r["label"]] > 1 or sum(1 for x in rows if x["label"] == r["label"]) > 1:
            r["label"] += " #%d" % seen[r["label"]]
    return rows


def tgid_map(pids):
    out = {}
    for pid in pids:
        try:
            for t in os.listdir("/proc/%d/task" % pid):
                out[int(t)] = pid
        except OSError:
            pass
    return out


def tcp_sockets(pid):
    """{socket inode: (local port, remote port)} from the process's network namespace."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = read_file("/proc/%d/net/%s" % (pid, name)).splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            out[f[9]] = (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16))
    return out


def fd_kinds(pids, listen_port, upstream_ports):
    """{(pid, fd): kind}: client (a connection accepted on the proxy's port), upstream (a
    connection to a backend), listen, socket (any other socket: admin, health checks to
    other ports), eventfd, epoll, timerfd, pipe, file."""
    kinds = {}
    tcp = tcp_sockets(pids[0]) if pids else {}
    for pid in pids:
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            kind = "file"
            m = re.match(r"socket:\[(\d+)\]", link)
            if m:
                lport, rport = tcp.get(m.group(1), (None, None))
                if lport == listen_port:
                    kind = "client" if rport else "listen"
                elif rport in upstream_ports:
                    kind = "upstream"
                else:
                    kind = "socket"
            elif link.startswith("anon_inode:"):
                kind = link[len("anon_inode:"):].strip("[]")
            elif link.startswith("pipe:"):
                kind = "pipe"
            kinds[(pid, int(fd))] = kind
    return kinds


# --------------------------------------------------------------------------- probes
# A probe is started on the proxy's processes just before a run's load and finished just
# after it (compare.Bench.measure, measure_upload below); it adds its numbers to the run.

def _stop(proc, sig=signal.SIGINT, timeout=20):
    """Ask a perf or strace child to finish (SIGINT: it writes its output), then kill it."""
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _spawn(argv, log_path):
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                preexec_fn=lc._child_setup)
    finally:
        log.close()


class TaskProbe:
    """Per-thread CPU and context switches from /proc."""

    def start(self, pids):
        self.pids, self.before = pids, task_snapshot(pids)

    def finish(self, res):
        res["tasks"] = task_delta(self.before, task_snapshot(self.pids))


class PeerProbe:
    """Context switches of the proxy's peers: the backend nginx (/proc) and wrk (the
    harness's reaped children, from getrusage). A voluntary switch is a sleep, so each one
    is a wake-up that someone (here, mostly the proxy writing to it) had to do."""

    def __init__(self, ctx):
        self.ctx = ctx

    def _read(self):
        b = task_snapshot(lc.proc_tree(self.ctx.backend.pid))
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (sum(t["vcs"] for t in b.values()), sum(t["nvcs"] for t in b.values()),
                r.ru_nvcsw, r.ru_nivcsw)

    def start(self, pids):
        self.before = self._read()

    def finish(self, res):
        d = [a - b for a, b in zip(self._read(), self.before)]
        res["peers"] = {"backend_vcs": d[0], "backend_nvcs": d[1], "wrk_vcs": d[2],
                        "wrk_nvcs": d[3]}


class PerfStat:
    """`perf stat -x,` attached to the proxy's processes (all their threads)."""

    def __init__(self, ctx, events, name):
        self.ctx, self.events = ctx, events
        self.out = os.path.join(ctx.out_dir, name + ".perfstat")

    def start(self, pids):
        if os.path.exists(self.out):
            os.unlink(self.out)
        self.proc = _spawn([self.ctx.tools["perf"], "stat", "-x", ",", "-o", self.out,
                            "-e", ",".join(self.events), "-p", ",".join(map(str, pids))],
                           self.out + ".log")
        time.sleep(0.5)  # attached before the load starts

    def finish(self, res):
        _stop(self.proc)
        counts = {}
        try:
            for line in read_file(self.out).splitlines():
                f = line.split(",")
                if len(f) < 3 or line.startswith("#"):
                    continue
                try:
                    counts[f[2]] = float(f[0])
                except ValueError:
                    counts[f[2]] = None  # <not supported>, <not counted>
        except OSError:
            pass
        res.setdefault("perf_stat", {}).update(counts)


class PerfRecord:
    """`perf record` (sampling, with call chains) attached to the proxy's processes."""

    def __init__(self, ctx, name, binary):
        self.ctx, self.binary = ctx, binary
        self.out = os.path.join(ctx.out_dir, name + ".perfdata")

    def start(self, pids):
        a = self.ctx.args
        self.proc = _spawn([self.ctx.tools["perf"], "record", "-e", self.ctx.perf_event,
                            "-F", str(a.perf_freq), "--call-graph", a.call_graph,
                            "-o", self.out, "-p", ",".join(map(str, pids))],
                           self.out + ".log")
        time.sleep(0.5)

    def finish(self, res):
        _stop(self.proc)
        res["perf_record"] = perf_report(self.ctx, self.out, self.binary)


def perf_report(ctx, path, binary, top=20):
    """Samples by DSO (kernel, the proxy's binary, libc, other) and the top symbols by
    self time."""
    base = [ctx.tools["perf"], "report", "-i", path, "--stdio", "--no-children", "-g", "none",
            "-n", "-q"]
    try:
        dso_out = subprocess.run(base + ["--sort", "dso"], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, timeout=300).stdout.decode(
                                     "utf-8", "replace")
        sym_out = subprocess.run(base + ["--sort", "dso,sym", "--percent-limit", "0.1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 timeout=300).stdout.decode("utf-8", "replace")
        inc_out = subprocess.run([ctx.tools["perf"], "report", "-i", path, "--stdio",
                                  "--children", "-g", "none", "-q", "--sort", "sym",
                                  "--percent-limit", "0.1"], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, timeout=300).stdout.decode(
                                     "utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    split, samples, dsos = {"kernel": 0.0, "binary": 0.0, "libc": 0.0, "other": 0.0}, 0, []
    for line in dso_out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\d+)\s+(.+?)\s*$", line)
        if not m:
            continue
        pct, n, dso = float(m.group(1)), int(m.group(2)), m.group(3)
        samples += n
        dsos.append({"dso": dso, "pct": pct, "samples": n})
        if dso.startswith("[kernel"):
            split["kernel"] += pct
        elif dso == binary:
            split["binary"] += pct
        elif dso.startswith("libc.so") or dso.startswith("libc-"):
            split["libc"] += pct
        else:
            split["other"] += pct
    syms = []
    for line in sym_out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\d+)\s+(\S+)\s+\[(.)\]\s+(.+?)\s*$", line)
        if m:
            sym = re.sub(r"::h[0-9a-f]{16}$", "", m.group(5))  # Rust legacy-mangling hash
            syms.append({"pct": float(m.group(1)), "samples": int(m.group(2)),
                         "dso": m.group(3), "kernel": m.group(4) == "k", "symbol": sym})
    kernel_inclusive = {}
    for line in inc_out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+([\d.]+)%\s+\[k\]\s+(\S+)", line)
        if m:
            kernel_inclusive.setdefault(m.group(3), float(m.group(1)))
    paths = {sym: kernel_inclusive.get(sym, 0.0) for _, sym in KERNEL_PATHS}
    return {"samples": samples, "split": split, "dsos": dsos, "top": syms[:top],
            "kernel_paths": paths,
            "kernel_inclusive_top": dict(sorted(kernel_inclusive.items(),
                                                key=lambda kv: -kv[1])[:60]),
            "event": ctx.perf_event, "call_graph": ctx.args.call_graph}


class StraceProbe:
    """`strace -f -C` attached to the proxy's processes, for a window in the middle of the
    run (`whole=False`) or for the whole run. strace stops the proxy at every system call,
    so the proxy runs several times slower while it is attached: its numbers are ratios
    per request within the window. The window's requests are counted by the backend
    (stub_status)."""

    def __init__(self, ctx, px, name, whole=False):
        self.ctx, self.px, self.whole = ctx, px, whole
        self.out = os.path.join(ctx.out_dir, name + ".strace")
        self.result = {}

    def start(self, pids):
        self.pids = pids
        if self.whole:
            self._attach()
            return
        self.thread = threading.Thread(target=self._window, daemon=True)
        self.thread.start()

    def _attached(self, tids):
        for tid, pid in tids.items():
            try:
                st = read_file("/proc/%d/task/%d/status" % (pid, tid))
            except OSError:
                continue
            if re.search(r"^TracerPid:\s+0$", st, re.M):
                return False
        return True

    def _attach(self):
        self.tids = tgid_map(self.pids)
        self.kinds = fd_kinds(self.pids, self.px.port, self.ctx.ports.backends)
        argv = [self.ctx.tools["strace"], "-f", "-C", "-qq", "-s", "0", "-o", self.out]
        for pid in self.pids:
            argv += ["-p", str(pid)]
        self.proc = _spawn(argv, self.out + ".log")
        deadline = time.monotonic() + 5
        while not self._attached(self.tids) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.s0, self.t0 = lc.stub_status(self.ctx.ports.stub), time.monotonic()

    def _detach(self):
        s1, t1 = lc.stub_status(self.ctx.ports.stub), time.monotonic()
        _stop(self.proc)
        for k, v in fd_kinds(self.pids, self.px.port, self.ctx.ports.backends).items():
            self.kinds.setdefault(k, v)
        self.tids.update(tgid_map(self.pids))
        r = parse_strace(self.out, self.tids, self.kinds, self.ctx.ports.backends)
        r["window_s"] = t1 - self.t0
        # The window's requests, as the backend counts them; minus the stub's own request.
        r["requests"] = (s1[1] - self.s0[1] - 1) if self.s0 and s1 else None
        self.result = r

    def _window(self):
        time.sleep(self.ctx.args.strace_delay)
        self._attach()
        time.sleep(self.ctx.args.strace_window)
        self._detach()

    def finish(self, res):
        if self.whole:
            self._detach()
        else:
            self.thread.join(self.ctx.args.strace_window + 60)
        res["strace"] = self.result


_LINE = re.compile(r"^(\d+)\s+(.*)$")
_RESUMED = re.compile(r"<\.\.\. (\w+) resumed>(.*)$")
_CALL = re.compile(r"(\w+)\((.*)$")
_RET = re.compile(r"\)\s+=\s+(-?\d+|\?|0x[0-9a-f]+)(?:\s+(E[A-Z0-9]+))?[^=]*$")


def parse_strace(path, tgid_of, kinds, upstream_ports):
    """Counts from strace's own output: calls and errors per system call; reads and writes
    per kind of file descriptor (calls, bytes, EAGAIN, EOF); epoll waits and the events
    they returned; futex wakes and waits. Plus strace's -C summary, verbatim.

    `kinds` comes from /proc snapshots at attach and detach; a connection accepted or
    opened to a backend inside the window is recognised by its accept or connect call."""
    kinds = dict(kinds)
    calls, errors = {}, {}
    io = {}
    epoll = {"calls": 0, "events": 0, "empty": 0}
    futex = {"wake": 0, "woken": 0, "wait": 0, "other": 0}
    pending = {}
    summary = []
    try:
        f = open(path, errors="replace")
    except OSError as e:
        return {"error": str(e)}
    with f:
        for line in f:
            m = _LINE.match(line)
            if not m:  # strace's -C summary table, at the end
                summary.append(line.rstrip("\n"))
                continue
            tid, rest = int(m.group(1)), m.group(2)
            if rest.startswith("<..."):
                mm = _RESUMED.match(rest)
                if not mm:
                    continue
                name = mm.group(1)
                head = pending.pop(tid, (name, ""))[1]
                args = head + mm.group(2)
            elif rest.startswith(("---", "+++")):
                continue
            else:
                mm = _CALL.match(rest)
                if not mm:
                    continue
                name, args = mm.group(1), mm.group(2)
                if args.endswith("<unfinished ...>"):
                    pending[tid] = (name, args[:-len("<unfinished ...>")])
                    continue
                if args.endswith("<detached ...>"):
                    continue  # cut by the end of the window
            rm = _RET.search(args)
            ret = None
            if rm and rm.group(1) not in ("?",):
                ret = int(rm.group(1), 0)
            calls[name] = calls.get(name, 0) + 1
            if ret is not None and ret < 0:
                errors[name] = errors.get(name, 0) + 1
            if name in ("accept", "accept4") and ret is not None and ret >= 0:
                kinds[(tgid_of.get(tid, tid), ret)] = "client"
            elif name == "connect":
                cm = re.match(r"\s*(\d+),.*?sin6?_port=htons\((\d+)\)", args)
                if cm and int(cm.group(2)) in upstream_ports:
                    kinds[(tgid_of.get(tid, tid), int(cm.group(1)))] = "upstream"
            if name in READ_CALLS or name in WRITE_CALLS:
                fm = re.match(r"\s*(\d+)", args)
                kind = kinds.get((tgid_of.get(tid, tid), int(fm.group(1))), "other") \
                    if fm else "other"
                d = io.setdefault(kind, {}).setdefault(
                    "read" if name in READ_CALLS else "write",
                    {"calls": 0, "bytes": 0, "ok": 0, "eagain": 0, "eof": 0, "by_call": {}})
                d["calls"] += 1
                d["by_call"][name] = d["by_call"].get(name, 0) + 1
                if ret is not None and ret > 0:
                    d["ok"] += 1
                    d["bytes"] += ret
                elif ret == 0:
                    d["eof"] += 1
                elif rm and rm.group(2) == "EAGAIN":
                    d["eagain"] += 1
            elif name in EPOLL_CALLS:
                epoll["calls"] += 1
                if ret is not None and ret >= 0:
                    epoll["events"] += ret
                    epoll["empty"] += ret == 0
            elif name == "futex":
                op = re.match(r"[^,]*,\s*(FUTEX_\w+)", args)
                op = op.group(1) if op else ""
                if "WAKE" in op:
                    futex["wake"] += 1
                    futex["woken"] += max(ret or 0, 0)
                elif "WAIT" in op:
                    futex["wait"] += 1
                else:
                    futex["other"] += 1
    return {"calls": calls, "errors": errors, "io": io, "epoll": epoll, "futex": futex,
            "total_calls": sum(calls.values()), "strace_summary": "\n".join(summary)}


# --------------------------------------------------------------------------- the upload

def chunked_body(nbytes):
    """nbytes of payload as 1-byte chunks: `1\\r\\nx\\r\\n` each, then the last chunk."""
    return b"1\r\nx\r\n" * nbytes + b"0\r\n\r\n"


def chunked_upload(port, body, nbytes, deadline_s):
    """POSTs the chunked body; the backend reads it whole and the sink behind it answers
    with the byte count it got, which must equal nbytes."""
    s = socket.create_connection((HOST, port), timeout=30)
    try:
        t0 = time.monotonic()
        s.sendall(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/octet-stream"
                  b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                  % (UPLOAD_PATH.encode(), HOST.encode(), port))
        mv = memoryview(body)
        for off in range(0, len(body), 1 << 16):
            if time.monotonic() - t0 > deadline_s:
                raise OSError("upload exceeded %d s" % deadline_s)
            s.sendall(mv[off:off + (1 << 16)])
        status, hdrs, rest = lc._read_response(s)
        want = int(hdrs.get("content-length", "0"))
        while len(rest) < want:
            d = s.recv(65536)
            if not d:
                break
            rest += d
        secs = time.monotonic() - t0
        got = int(rest.strip() or b"-1") if status == 200 else -1
        if status != 200 or got != nbytes:
            return {"ok": False, "error": "status %d, sink got %d of %d bytes"
                    % (status, got, nbytes), "seconds": secs}
        return {"ok": True, "seconds": secs}
    finally:
        s.close()


def measure_upload(ctx, px, label, probes=()):
    """One chunked upload through px (None: straight to the backend), with the proxy's CPU
    (user, system) and the backend's, from /proc."""
    port = ctx.ports.backends[0] if px is None else px.port
    pids = px.pids() if px else []
    bpids = lc.proc_tree(ctx.backend.pid)
    for probe in probes:
        probe.start(pids)
    (u0, s0), b0, t0 = lc.cpu_split(pids), lc.cpu_seconds(bpids), task_snapshot(pids)
    try:
        res = chunked_upload(port, ctx.upload_body, ctx.args.upload_bytes,
                             ctx.args.upload_timeout)
    except OSError as e:
        res = {"ok": False, "error": str(e)}
    (u1, s1), b1, t1 = lc.cpu_split(pids), lc.cpu_seconds(bpids), task_snapshot(pids)
    for probe in probes:
        probe.finish(res)
    res.update({"proxy": px.name if px else "direct", "run": label,
                "backend_cpu_s": b1 - b0, "tasks": task_delta(t0, t1)})
    if px:
        res.update({"proxy_user_s": u1 - u0, "proxy_sys_s": s1 - s0,
                    "proxy_cpu_s": (u1 - u0) + (s1 - s0)})
    return res


# --------------------------------------------------------------------------- summary

def per(n, d, scale=1.0):
    return None if n is None or not d else n / d * scale


def summarize_proxy(name, clean, sysc, strace_run, rec_run, uploads):
    """The numbers the tables show, for one proxy."""
    out = {"proxy": name}
    good = [r for r in clean if r.get("ok") and r.get("requests")]
    reqs = sum(r["requests"] for r in good)
    out["requests"] = reqs
    out["rps"] = statistics.median([r["rps"] for r in good]) if good else None
    out["user_per_100k"] = per(sum(r["proxy_user_s"] for r in good), reqs, 1e5)
    out["sys_per_100k"] = per(sum(r["proxy_sys_s"] for r in good), reqs, 1e5)
    out["cpu_per_100k_runs"] = [r["proxy_cpu_per_100k"] for r in good]
    out["contaminated"] = sum(1 for r in clean if r.get("contaminated"))
    out["errors"] = sum(r.get("error_count", 0) for r in clean) + \
        sum(1 for r in clean if not r.get("ok"))
    threads = {}
    for r in good:
        for t in r.get("tasks", []):
            a = threads.setdefault(t["label"], {"user_s": 0, "sys_s": 0, "vcs": 0, "nvcs": 0})
            for k in a:
                a[k] += t[k]
    out["threads"] = [{"label": k, "user_per_100k": per(v["user_s"], reqs, 1e5),
                       "sys_per_100k": per(v["sys_s"], reqs, 1e5),
                       "vcs_per_req": per(v["vcs"], reqs), "nvcs_per_req": per(v["nvcs"], reqs)}
                      for k, v in threads.items()]
    out["vcs_per_req"] = per(sum(v["vcs"] for v in threads.values()), reqs)
    out["nvcs_per_req"] = per(sum(v["nvcs"] for v in threads.values()), reqs)
    out["peers_per_req"] = {k: per(sum(r["peers"][k] for r in good if "peers" in r), reqs)
                            for k in ("backend_vcs", "backend_nvcs", "wrk_vcs", "wrk_nvcs")}
    perf = {}
    for r in good:
        for k, v in (r.get("perf_stat") or {}).items():
            perf[k] = None if v is None or perf.get(k, 0) is None else perf.get(k, 0) + v
    out["perf_per_req"] = {k: per(v, reqs) for k, v in perf.items()}
    # System calls by type from perf's tracepoints (one whole run, proxy undisturbed).
    tp = {}
    if sysc and sysc.get("ok") and sysc.get("requests"):
        for k, v in (sysc.get("perf_stat") or {}).items():
            if v is None:
                continue
            call = k.split("sys_enter_")[-1] if "sys_enter_" in k else "total"
            tp[call] = v / sysc["requests"]
    out["tracepoints_per_req"] = tp
    st = (strace_run or {}).get("strace") or {}
    n = st.get("requests")
    out["strace"] = None
    if n:
        io = st.get("io", {})

        def side(kind, d, key):
            return (io.get(kind, {}).get(d) or {}).get(key, 0)

        out["strace"] = {
            "requests": n, "window_s": st["window_s"], "rps": n / st["window_s"],
            "calls_per_req": {k: v / n for k, v in st["calls"].items()},
            "errors_per_req": {k: v / n for k, v in st["errors"].items()},
            "total_per_req": st["total_calls"] / n,
            "reads_per_req": {k: side(k, "read", "calls") / n for k in io},
            "writes_per_req": {k: side(k, "write", "calls") / n for k in io},
            "eagain_reads_per_req": sum(side(k, "read", "eagain") for k in io) / n,
            "bytes_per_write": {k: per(side(k, "write", "bytes"), side(k, "write", "ok"))
                                for k in io},
            "bytes_per_read": {k: per(side(k, "read", "bytes"), side(k, "read", "ok"))
                               for k in io},
            "epoll_per_req": st["epoll"]["calls"] / n,
            "events_per_epoll": per(st["epoll"]["events"], st["epoll"]["calls"]),
            "futex_wake_per_req": st["futex"]["wake"] / n,
            "futex_wait_per_req": st["futex"]["wait"] / n,
        }
    out["perf_record"] = (rec_run or {}).get("perf_record")
    ups = [u for u in uploads if u.get("run", "").startswith("clean")]
    okups = [u for u in ups if u.get("ok")]
    clock = [(u.get("perf_stat") or {}).get("task-clock") for u in okups]
    out["upload"] = {
        "runs": len(ups), "ok": len(okups),
        # perf's task-clock (ms, to the nanosecond) where there is one; else /proc's ticks.
        "cpu_s": [c / 1000 for c in clock] if clock and None not in clock
        else [u["proxy_cpu_s"] for u in okups],
        "cpu_source": "task-clock" if clock and None not in clock else "/proc",
        "user_s": statistics.median([u["proxy_user_s"] for u in okups]) if okups else None,
        "sys_s": statistics.median([u["proxy_sys_s"] for u in okups]) if okups else None,
        "seconds": statistics.median([u["seconds"] for u in okups]) if okups else None,
        "backend_cpu_s": statistics.median([u["backend_cpu_s"] for u in okups])
        if okups else None,
    }
    for u in uploads:
        if u.get("run") == "syscalls" and u.get("ok"):
            out["upload"]["syscalls"] = {
                (k.split("sys_enter_")[-1] if "sys_enter_" in k else "total"): v
                for k, v in (u.get("perf_stat") or {}).items() if v is not None}
        if u.get("run") == "perf-record":
            out["upload"]["perf_record"] = u.get("perf_record")
        if u.get("run") == "strace" and u.get("ok") and (u.get("strace") or {}).get("io"):
            t = u["strace"]

            def tot(kind, d, key):
                return ((t["io"].get(kind) or {}).get(d) or {}).get(key, 0)
            out["upload"]["strace"] = {
                "calls": t["total_calls"],
                "client_reads": tot("client", "read", "calls"),
                "bytes_per_client_read": per(tot("client", "read", "bytes"),
                                             tot("client", "read", "ok")),
                "upstream_writes": tot("upstream", "write", "calls"),
                "bytes_per_upstream_write": per(tot("upstream", "write", "bytes"),
                                                tot("upstream", "write", "ok")),
                "futex_wakes": t["futex"]["wake"], "epoll_waits": t["epoll"]["calls"]}
    return out


# --------------------------------------------------------------------------- report

def f2(v, nd=2):
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return "{:,.0f}".format(v)
    return ("%%.%df" % nd) % v


def minmax(vals, nd=2):
    if not vals:
        return "–"
    if len(vals) == 1:
        return f2(vals[0], nd)
    return "%s (%s–%s)" % (f2(statistics.median(vals), nd), f2(min(vals), nd),
                           f2(max(vals), nd))


def print_tables(summ, order, args, direct_upload):
    o = []
    S = [summ[p] for p in order if p in summ]
    o.append("### CPU per 100k requests (clean runs: /proc only)\n")
    o.append("`wrk -t1 -c64 -d%ds` GET /, %d run(s) per proxy; CPU seconds from "
             "`/proc/PID/stat` of the proxy's processes; context switches summed over "
             "`/proc/PID/task/*/status`.\n" % (args.duration, args.runs))
    o.append("| proxy | rps | user s | system s | total s (median, min–max of runs) "
             "| system share | voluntary cs/req | involuntary cs/req |")
    o.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in S:
        tot = (s["user_per_100k"] or 0) + (s["sys_per_100k"] or 0)
        mark = (" ⚠" if s["errors"] else "") + (" ~" if s["contaminated"] else "")
        o.append("| %s%s | %s | %s | %s | %s | %s | %s | %s |" % (
            s["proxy"], mark, f2(s["rps"], 0), f2(s["user_per_100k"]), f2(s["sys_per_100k"]),
            minmax(s["cpu_per_100k_runs"]),
            "%.0f%%" % (100 * s["sys_per_100k"] / tot) if tot else "–",
            f2(s["vcs_per_req"], 3), f2(s["nvcs_per_req"], 3)))

    o.append("\n### Per thread (clean runs), per 100k requests\n")
    o.append("| proxy | thread | user s | system s | voluntary cs/req | involuntary cs/req |")
    o.append("|---|---|---:|---:|---:|---:|")
    for s in S:
        for t in sorted(s["threads"], key=lambda t: t["label"]):
            if (t["user_per_100k"] or 0) + (t["sys_per_100k"] or 0) < 0.005 and \
                    (t["vcs_per_req"] or 0) < 0.0005:
                continue  # idle during the runs
            o.append("| %s | %s | %s | %s | %s | %s |" % (
                s["proxy"], t["label"], f2(t["user_per_100k"]), f2(t["sys_per_100k"]),
                f2(t["vcs_per_req"], 3), f2(t["nvcs_per_req"], 3)))

    o.append("\n### perf stat (clean runs), per request\n")
    o.append("n/s: not supported on this machine.\n")
    o.append("| proxy | task-clock ms | context-switches | cpu-migrations | page-faults "
             "| cycles | instructions |")
    o.append("|---|---:|---:|---:|---:|---:|---:|")
    for s in S:
        p = s["perf_per_req"]
        if not p:
            o.append("| %s | perf not available | | | | | |" % s["proxy"])
            continue

        def cell(k, nd=3):
            if k not in p or p[k] is None:
                return "n/s"  # a counter this machine does not have (see the notes)
            return f2(p[k], nd)
        o.append("| %s | %s | %s | %s | %s | %s | %s |" % (
            s["proxy"], cell("task-clock", 4), cell("context-switches"),
            cell("cpu-migrations", 4), cell("page-faults", 4), cell("cycles", 0),
            cell("instructions", 0)))

    o.append("\n### System calls per request, by type\n")
    o.append("Each cell: strace window / perf tracepoints (a whole run, proxy undisturbed). "
             "Calls under 0.01 per request in every column are left out.\n")
    names = set()
    for s in S:
        names |= set((s["strace"] or {}).get("calls_per_req", {}))
        names |= set(k for k in s["tracepoints_per_req"] if k != "total")

    def val(s, k):
        a = (s["strace"] or {}).get("calls_per_req", {}).get(k)
        b = s["tracepoints_per_req"].get(k)
        return a, b
    rows = []
    for k in names:
        vals = [v for s in S for v in val(s, k) if v is not None]
        if vals and max(vals) >= 0.01:
            rows.append((max(vals), k))
    o.append("| system call | " + " | ".join(s["proxy"] for s in S) + " |")
    o.append("|---|" + "---:|" * len(S))
    for _, k in sorted(rows, reverse=True):
        o.append("| %s | %s |" % (k, " | ".join("%s / %s" % tuple(f2(x, 3) for x in val(s, k))
                                             for s in S)))
    o.append("| **all** | %s |" % " | ".join(
        "%s / %s" % (f2((s["strace"] or {}).get("total_per_req"), 2),
                     f2(s["tracepoints_per_req"].get("total"), 2)) for s in S))

    o.append("\n### Reads and writes per request (strace window)\n")
    o.append("client: connections accepted from wrk; upstream: connections to the backends. "
             "Bytes per call count successful calls only.\n")
    o.append("| proxy | rps in window | client reads | client writes | upstream reads "
             "| upstream writes | EAGAIN reads | bytes/write client | bytes/write upstream "
             "| bytes/read client | bytes/read upstream |")
    o.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in S:
        t = s["strace"]
        if not t:
            o.append("| %s | strace not run | | | | | | | | | |" % s["proxy"])
            continue
        o.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            s["proxy"], f2(t["rps"], 0), f2(t["reads_per_req"].get("client"), 3),
            f2(t["writes_per_req"].get("client"), 3), f2(t["reads_per_req"].get("upstream"), 3),
            f2(t["writes_per_req"].get("upstream"), 3), f2(t["eagain_reads_per_req"], 3),
            f2(t["bytes_per_write"].get("client"), 0),
            f2(t["bytes_per_write"].get("upstream"), 0),
            f2(t["bytes_per_read"].get("client"), 0), f2(t["bytes_per_read"].get("upstream"), 0)))

    o.append("\n### Wake-ups per request\n")
    o.append("Voluntary context switches (a thread went to sleep, and was woken later) from "
             "the clean runs, for the proxy and for its peers; the calls from strace and "
             "perf's tracepoints.\n")
    o.append("| proxy | voluntary cs (clean) | backend's voluntary cs | wrk's voluntary cs "
             "| epoll waits (strace / tracepoints) "
             "| events per epoll wait | futex wakes | futex waits | eventfd reads + writes |")
    o.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in S:
        t = s["strace"] or {}
        tp = s["tracepoints_per_req"]
        ep_tp = sum(tp.get(k, 0) for k in EPOLL_CALLS) if tp else None
        ev = None
        if t:
            ev = sum(v for k, v in t["reads_per_req"].items() if k == "eventfd") + \
                sum(v for k, v in t["writes_per_req"].items() if k == "eventfd")
        o.append("| %s | %s | %s | %s | %s / %s | %s | %s | %s | %s |" % (
            s["proxy"], f2(s["vcs_per_req"], 3), f2(s["peers_per_req"]["backend_vcs"], 3),
            f2(s["peers_per_req"]["wrk_vcs"], 3), f2(t.get("epoll_per_req"), 3), f2(ep_tp, 3),
            f2(t.get("events_per_epoll"), 1), f2(t.get("futex_wake_per_req"), 3),
            f2(t.get("futex_wait_per_req"), 3), f2(ev, 3)))

    def split_row(label, pr):
        if not pr or "split" not in pr:
            return "| %s | – | | | | |" % label
        sp = pr["split"]
        return "| %s | {:,} | %.1f%% | %.1f%% | %.1f%% | %.1f%% |".format(pr["samples"]) % (
            label, sp["kernel"], sp["binary"], sp["libc"], sp["other"])

    o.append("\n### Where the samples fall (perf record, one run)\n")
    o.append("| proxy | samples | kernel | own binary | libc | other libraries |")
    o.append("|---|---:|---:|---:|---:|---:|")
    for s in S:
        o.append(split_row(s["proxy"], s["perf_record"]))

    def kernel_table(cols, title, unit):
        cols = [c for c in cols if c[1] and "kernel_paths" in c[1]]
        if not cols:
            return
        o.append("\n### %s\n" % title)
        o.append("Share of the proxy's samples under a kernel function, callees included "
                 "(`perf report --children`), and in brackets that share of %s. The paths "
                 "nest, so they overlap.\n" % unit)
        o.append("| kernel path | " + " | ".join(c[0] for c in cols) + " |")
        o.append("|---|" + "---:|" * len(cols))
        rows = [("all kernel", lambda pr: pr["split"]["kernel"])] + \
            [(label, lambda pr, sym=sym: pr["kernel_paths"][sym]) for label, sym in KERNEL_PATHS]
        for label, get in rows:
            o.append("| %s | %s |" % (label, " | ".join(
                "%.1f%% (%s)" % (get(c[1]), f2(get(c[1]) * c[2] / 100, 3)) for c in cols)))

    kernel_table([(s["proxy"], s["perf_record"],
                   (s["user_per_100k"] or 0) + (s["sys_per_100k"] or 0)) for s in S],
                 "Kernel time by path, GET (perf record -g)",
                 "the clean runs' CPU seconds per 100k requests")

    def top_table(pr, title):
        if not pr or not pr.get("top"):
            return
        o.append("\n### %s\n" % title)
        o.append("Self time, %d samples of `%s`.\n" % (pr["samples"], pr["event"]))
        o.append("| % | where | symbol |")
        o.append("|---:|---|---|")
        for t in pr["top"]:
            sym = t["symbol"]
            if len(sym) > 110:
                sym = sym[:107] + "..."
            o.append("| %.2f | %s | `%s` |" % (t["pct"], "kernel" if t["kernel"] else t["dso"],
                                             sym.replace("|", "\\|")))
    if "fairway" in summ:
        top_table(summ["fairway"]["perf_record"], "fairway: top 20 symbols, GET")

    o.append("\n### Chunked upload: 1 MiB as 1-byte chunks\n")
    o.append("%d run(s) per proxy. CPU: the proxy's, for the whole upload: perf's task-clock "
             "(median, min–max), and user and system from `/proc` (medians, 10 ms ticks). "
             "Client reads and upstream writes: strace attached for one more whole upload. "
             "System calls: perf's tracepoints, one more upload (`write`: plain write(2) "
             "calls, not the socket writes).\n" % args.upload_runs)
    o.append("| proxy | ok | seconds | CPU s | user s | system s | backend CPU s "
             "| client reads (bytes each) | upstream writes (bytes each) | system calls "
             "| epoll waits | `write` | futex | kernel / binary / libc samples |")
    o.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    if direct_upload:
        d = [u for u in direct_upload if u.get("ok")]
        o.append("| direct | %d/%d | %s | | | | %s | | | | | | | |" % (
            len(d), len(direct_upload),
            f2(statistics.median([u["seconds"] for u in d]) if d else None, 3),
            f2(statistics.median([u["backend_cpu_s"] for u in d]) if d else None, 3)))
    for s in S:
        u = s["upload"]
        sc = u.get("syscalls") or {}
        t = u.get("strace") or {}
        pr = u.get("perf_record") or {}
        sp = pr.get("split")
        o.append("| %s | %d/%d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |"
                 % (s["proxy"], u["ok"], u["runs"], f2(u["seconds"], 3), minmax(u["cpu_s"], 3),
                    f2(u["user_s"], 2), f2(u["sys_s"], 2), f2(u["backend_cpu_s"], 2),
                    "%s (%s)" % (f2(t["client_reads"], 0), f2(t["bytes_per_client_read"], 0))
                    if t else "–",
                    "%s (%s)" % (f2(t["upstream_writes"], 0),
                                 f2(t["bytes_per_upstream_write"], 0)) if t else "–",
                    f2(sc.get("total"), 0),
                    f2(sum(v for k, v in sc.items() if k in EPOLL_CALLS), 0) if sc else "–",
                    f2(sc.get("write", 0), 0) if sc else "–",
                    f2(sc.get("futex", 0), 0) if sc else "–",
                    "%.0f / %.0f / %.0f %%" % (sp["kernel"], sp["binary"], sp["libc"])
                    if sp else "–"))
    kernel_table([(s["proxy"], s["upload"].get("perf_record"),
                   statistics.median(s["upload"]["cpu_s"]) if s["upload"]["cpu_s"] else 0)
                  for s in S], "Kernel time by path, chunked upload (perf record -g)",
                 "the upload's CPU seconds")
    if "fairway" in summ:
        top_table(summ["fairway"]["upload"].get("perf_record"),
                  "fairway: top 20 symbols, chunked upload")
    o.append("\n⚠ = request errors or failed runs; ~ = another process used more than 15% of "
             "a core during a clean run.")
    print("\n".join(o))
    sys.stdout.flush()


# --------------------------------------------------------------------------- main

class Ctx:
    pass


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Profile fairway, nginx and HAProxy under one fixed load "
                    "(see benches/load/README.md, \"Profile\").")
    ap.add_argument("--fairway", default="target/release/fairway",
                    help="fairway binary (default: target/release/fairway)")
    ap.add_argument("--only", default=",".join(lc.ALL_PROXIES),
                    help="proxies, comma-separated, in this order (default nginx,haproxy,fairway)")
    ap.add_argument("--duration", type=int, default=5,
                    help="seconds per wrk run (default 5)")
    ap.add_argument("--runs", type=int, default=3,
                    help="clean runs per proxy for the /proc numbers (default 3)")
    ap.add_argument("--strace-window", type=float, default=2.0,
                    help="seconds strace stays attached, in the middle of a run (default 2)")
    ap.add_argument("--strace-delay", type=float, default=1.0,
                    help="seconds into the run before strace attaches (default 1)")
    ap.add_argument("--perf-freq", type=int, default=1999,
                    help="perf record sampling frequency, Hz (default 1999)")
    ap.add_argument("--call-graph", default="fp",
                    help="perf record --call-graph mode: fp (default), dwarf, lbr")
    ap.add_argument("--upload-bytes", type=int, default=1 << 20,
                    help="payload of the chunked upload, sent as 1-byte chunks (default 1 MiB)")
    ap.add_argument("--upload-runs", type=int, default=3,
                    help="measured uploads per proxy (default 3)")
    ap.add_argument("--upload-timeout", type=int, default=120,
                    help="seconds one upload may take (default 120)")
    ap.add_argument("--no-strace", action="store_true", help="skip the strace window")
    ap.add_argument("--no-perf", action="store_true", help="skip perf stat and perf record")
    ap.add_argument("--base-port", type=int, default=28100,
                    help="ports used: BASE+1..5, +10, +20, +30, +31 (default 28100)")
    ap.add_argument("--out", default=None,
                    help="raw results JSON (default /tmp/fairway-profile-<UTC time>.json)")
    ap.add_argument("--tables", metavar="JSON", default=None,
                    help="print the tables of a saved run (its --out file) and exit")
    ap.add_argument("--keep", action="store_true",
                    help="keep the run directory (configs, logs, perf data, strace output)")
    a = ap.parse_args(argv)
    a.proxies = [p.strip() for p in a.only.split(",") if p.strip()]
    bad = [p for p in a.proxies if p not in lc.ALL_PROXIES]
    if bad or not a.proxies:
        ap.error("--only: unknown proxy %s; choose from %s" % (bad, ",".join(lc.ALL_PROXIES)))
    if a.duration < a.strace_delay + a.strace_window + 1:
        ap.error("--duration must leave the strace window and 1 s after it inside the run")
    if a.runs < 1 or a.upload_runs < 1:
        ap.error("--runs and --upload-runs must be >= 1")
    a.big = False  # compare.Bench reads it
    return a


def perf_capabilities(perf):
    """Which counters this machine has (virtual machines often lack cycles and
    instructions), the sampling event for perf record, and the syscall tracepoints."""
    r = subprocess.run([perf, "stat", "-x", ",", "-e", ",".join(COUNTERS), "true"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    counters = []
    for line in r.stderr.decode("utf-8", "replace").splitlines():
        f = line.split(",")
        if len(f) > 2 and f[2] in COUNTERS and not f[0].startswith("<not supported>"):
            counters.append(f[2])
    r = subprocess.run([perf, "list", "syscalls:sys_enter_*"], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, timeout=60)
    tps = set(re.findall(r"syscalls:sys_enter_(\w+)", r.stdout.decode("utf-8", "replace")))
    r = subprocess.run([perf, "stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "true"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    raw = r.returncode == 0 and "<not supported>" not in r.stderr.decode()
    return {"counters": counters, "record_event": "cycles" if "cycles" in counters
            else "cpu-clock", "tracepoints": sorted(tps), "raw_syscalls": raw}


def reprint(path):
    """The tables of a saved run, from its JSON."""
    r = json.load(open(path))
    a = argparse.Namespace(**r["args"])
    print("date: %s UTC; command: python3 benches/load/profile.py %s" % (
        r["started_utc"], " ".join(r["argv"])))
    m = r["machine"]
    print("machine: %d CPUs, %s, %s\n" % (m["nproc"], m["cpu_model"], m["kernel"]))
    print_tables(r["summary"], a.proxies, a, r["direct_uploads"])
    return 0


def main(argv):
    args = parse_args(argv)
    if args.tables:
        return reprint(args.tables)
    started = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    out_path = args.out or "/tmp/fairway-profile-%s.json" % stamp

    def body(session):
        children = session.children
        status = 0
        shape = lc.machine_shape()
        print("# fairway profile: where the time goes\n")
        print("date: %s" % time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)))
        print("command: python3 benches/load/profile.py %s" % " ".join(argv))
        print("machine: %d CPUs usable (%d online), %s, %s, %s RAM, loadavg %s" % (
            shape["nproc"], shape["cpus_online"], shape["cpu_model"], shape["kernel"],
            shape["memory"], " ".join(shape["loadavg"])))
        tools, versions, notes = lc.check_tools(args, args.proxies, [])
        for t in ("strace", "perf"):
            tools[t] = lc.find_tool(t)
        if args.no_strace:
            tools["strace"] = None
        if args.no_perf:
            tools["perf"] = None
        if not tools["strace"]:
            notes.append("strace: not used (missing or --no-strace): no strace window, no "
                         "reads/writes per request. Debian/Ubuntu: apt-get install strace")
        caps = None
        if tools["perf"]:
            versions["perf"] = lc.tool_version([tools["perf"], "--version"])
            caps = perf_capabilities(tools["perf"])
            missing = [c for c in COUNTERS if c not in caps["counters"]]
            if missing:
                notes.append("perf: not supported here: %s; perf record samples %s"
                             % (", ".join(missing), caps["record_event"]))
        else:
            notes.append("perf: not used (missing or --no-perf): no counters, no symbols. "
                         "Debian: apt-get install linux-perf")
        if tools["strace"]:
            versions["strace"] = lc.tool_version([tools["strace"], "-V"])
        run_dir, body16k = lc.make_run_dir()
        session.run_dir = run_dir
        fairway_bin = None
        if "fairway" in args.proxies:
            fairway_bin, fairway_src, fv = lc.prepare_fairway(args.fairway, run_dir)
            versions["fairway"] = "%s (%s)" % (fv, fairway_src)
        print("tools: " + "; ".join("%s: %s" % kv for kv in versions.items()))
        for n in notes:
            print("note: " + n)
        ports = lc.Ports(args.base_port)
        lc.check_ports_free([p for p in ports.all(args.proxies, True) if p != ports.nginx_h2])
        bg = lc.background_busy()
        print("background CPU before start: %.0f%% of the machine" % bg)
        if bg > 10:
            print("warning: the machine is not quiet; numbers will be noisy")

        backend, bconf = lc.start_backend(children, tools, run_dir, ports, body16k,
                                          sink=True, buffered_upload=True)
        proxies = lc.make_proxies(args.proxies, run_dir, ports, tools, fairway_bin, False)
        bench = lc.Bench(args, tools, run_dir, ports, backend, body16k)
        ctx = Ctx()
        ctx.args, ctx.tools, ctx.run_dir, ctx.ports, ctx.backend = \
            args, tools, run_dir, ports, backend
        # Not the run directory itself: fairway watches it (its config is there).
        ctx.out_dir = os.path.join(run_dir, "scratch")
        ctx.perf_event = caps["record_event"] if caps else None
        ctx.upload_body = chunked_body(args.upload_bytes)
        print("proxies: %s; %d clean run(s) of %d s each, then strace, syscall tracepoints, "
              "perf record; %d upload(s)\n" % (", ".join(args.proxies), args.runs,
                                               args.duration, args.upload_runs))

        # The upload path, straight to the backend: checks the sink and warms it.
        direct_upload = [measure_upload(ctx, None, "direct-%d" % i) for i in range(2)]
        for u in direct_upload:
            print("  direct   upload  %s" % upload_line(u))
        if not any(u.get("ok") for u in direct_upload):
            raise SetupError("the chunked upload fails straight to the backend: %s"
                             % direct_upload[0].get("error"))

        runs, uploads, summ = [], [], {}
        for name in args.proxies:
            px = proxies[name]
            lc.start_proxy(children, px, run_dir, "%s.log" % name, body16k)
            lc.run_wrk(tools, bench.lua, px.port, lc.SCENARIOS[SCENARIO], 1)  # warm-up
            binary = os.path.basename(px.argv[0])
            pr = []

            def run(kind, probes):
                r = bench.measure(px, SCENARIO, 1, probes=probes)
                r["kind"] = kind
                runs.append(r)
                pr.append(r)
                print("  %-8s %-12s %s" % (name, kind, lc.run_line(r)))
                sys.stdout.flush()
                if px.proc.poll() is not None:
                    raise SetupError("%s exited during %s:\n%s" % (
                        name, kind, lc.log_tail(px.proc.log_path)))
                time.sleep(0.5)
                return r

            clean = []
            for i in range(args.runs):
                probes = [TaskProbe(), PeerProbe(ctx)]  # before PerfStat: see PeerProbe
                if tools["perf"]:
                    probes.append(PerfStat(ctx, caps["counters"], "%s-clean%d" % (name, i)))
                clean.append(run("clean-%d" % (i + 1), probes))
            strace_run = None
            if tools["strace"]:
                strace_run = run("strace", [StraceProbe(ctx, px, name)])
            sysc = rec = None
            if tools["perf"]:
                seen = set((strace_run or {}).get("strace", {}).get("calls", {})) \
                    or set(DEFAULT_SYSCALLS)
                evs = ["syscalls:sys_enter_" + c for c in sorted(seen)
                       if c in caps["tracepoints"]]
                if caps["raw_syscalls"]:
                    evs.insert(0, "raw_syscalls:sys_enter")
                sysc = run("syscalls", [PerfStat(ctx, evs, name + "-syscalls")])
                rec = run("perf-record", [PerfRecord(ctx, name + "-get", binary)])

            ups = []
            for i in range(args.upload_runs):
                # task-clock: the CPU time to the nanosecond, where /proc counts 10 ms ticks.
                ups.append(measure_upload(ctx, px, "clean-%d" % (i + 1), [PerfStat(
                    ctx, ["task-clock", "context-switches"], "%s-upload%d" % (name, i))]
                    if tools["perf"] else []))
            if tools["strace"]:
                ups.append(measure_upload(ctx, px, "strace", [StraceProbe(
                    ctx, px, name + "-upload", whole=True)]))
            if tools["perf"]:
                ups.append(measure_upload(ctx, px, "syscalls", [PerfStat(
                    ctx, evs, name + "-upload-syscalls")]))
                ups.append(measure_upload(ctx, px, "perf-record", [PerfRecord(
                    ctx, name + "-upload", binary)]))
            for u in ups:
                print("  %-8s upload %-12s %s" % (name, u["run"], upload_line(u)))
            uploads += ups
            children.stop(px.proc)
            px.proc = None
            summ[name] = summarize_proxy(name, clean, sysc, strace_run, rec, ups)

        print("\nmachine: %d CPUs, %s, %s\n" % (shape["nproc"], shape["cpu_model"],
                                                shape["kernel"]))
        print_tables(summ, args.proxies, args, direct_upload)
        bad = [r for r in runs if not r.get("ok") or r.get("error_count")] + \
            [u for u in uploads if not u.get("ok")]
        if bad:
            status = 1
        wall = time.time() - started
        result = {
            "started_utc": stamp, "wall_s": wall, "machine": shape, "tools": versions,
            "perf_capabilities": caps, "notes": notes, "argv": argv,
            "args": {k: v for k, v in vars(args).items()},
            "ports": vars(ports), "scenario": lc.SCENARIOS[SCENARIO],
            "configs": {"backend": read_file(bconf),
                        **{p.name: p.conf_text for p in proxies.values()}},
            "runs": runs, "uploads": uploads, "direct_uploads": direct_upload,
            "summary": summ,
        }
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print("\nraw results: %s\nwall time: %.0f s" % (out_path, wall))
        return status

    return lc.run_session(args, body)


def upload_line(u):
    if not u.get("ok"):
        return "FAILED: %s" % u.get("error")
    s = "%6.3f s" % u["seconds"]
    if "proxy_cpu_s" in u:
        s += "  cpu %.3f s (user %.3f, sys %.3f)" % (u["proxy_cpu_s"], u["proxy_user_s"],
                                                      u["proxy_sys_s"])
    return s + "  backend cpu %.3f s" % u["backend_cpu_s"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
