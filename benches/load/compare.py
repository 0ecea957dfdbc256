#!/usr/bin/env python3
"""Side-by-side load comparison: fairway vs nginx vs HAProxy on this machine.

Starts one nginx as three static upstreams, fronts them in turn with each proxy,
drives every proxy with the same wrk/oha/h2load scenarios in interleaved rounds
and prints markdown tables of medians and of fairway's per-round ratios. With
--compression, more rounds compare response compression: a ~1 MiB JavaScript bundle through
nginx's gzip and fairway's gzip, Brotli and zstd, and small answers with compression on.

Python 3 standard library only (--compression checks br and zstd answers with the brotli
and zstd modules when they are importable). Installs nothing. See README.md beside this file.
Exit status: 0 ok, 1 some run failed or saw request errors, 2 setup failure.
"""

import argparse
import ctypes
import gzip
import hashlib
import http.client
import importlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY_16K = 16384
ALL_PROXIES = ["nginx", "haproxy", "fairway"]

# name -> how it is driven. Run in this order inside a proxy's slot of a round.
SCENARIOS = {
    "small-c64": {"tool": "wrk", "conns": 64, "path": "/",
                  "what": "GET / (3-byte body), 64 keep-alive connections"},
    "small-c256": {"tool": "wrk", "conns": 256, "path": "/",
                   "what": "GET /, 256 keep-alive connections"},
    "16k-c64": {"tool": "wrk", "conns": 64, "path": "/16k",
                "what": "GET /16k (16 KiB body), 64 keep-alive connections"},
    "close-c64": {"tool": "wrk", "conns": 64, "path": "/", "close": True,
                  "what": "GET / with Connection: close: one TCP connection per request"},
    "h2-c8x8": {"tool": "h2load", "conns": 8, "streams": 8, "path": "/",
                "what": "h2c (prior knowledge) GET /, 8 connections x 8 streams (needs h2load)"},
    "latency-10k": {"tool": "oha", "conns": 64, "rate": 10000, "path": "/",
                    "what": "fixed 10k req/s, 64 connections, latency corrected for "
                            "coordinated omission (needs oha)"},
    "conns-1000": {"tool": "wrk", "conns": 1000, "path": "/",
                   "what": "GET /, 1000 keep-alive connections; peak RSS is the number to read"},
    # 9,000, not 10,000: HAProxy gets two fds per connection and this harness caps its
    # maxconn to fit the open-files limit (9,900 under a 20,000 hard limit).
    "idle-9k": {"tool": "idle", "conns": 9000, "hold": 2, "path": "/",
                "what": "9,000 keep-alive connections, one GET each, then held idle; "
                        "peak RSS is the number to read"},
}
BIG_SCENARIOS = ["upload-big", "download-big"]

# --compression: a ~1 MiB JavaScript bundle, served by the backend as it is, compressed by
# the proxy; and the small answer with compression on but below its minimum length.
BUNDLE_PATH = "/bundle.js"
BUNDLE_TARGET = 1 << 20
# Where real JavaScript is looked for, in this order (npm's own files, Debian's packages).
JS_ROOTS = ["/usr/lib/node_modules", "/usr/local/lib/node_modules", "/usr/share/nodejs",
            "/usr/share/javascript"]
COMP_SCENARIOS = {
    "bundle-identity": {"tool": "wrk", "conns": 8, "path": BUNDLE_PATH, "coding": None,
                        "headers": [],
                        "what": "GET /bundle.js without Accept-Encoding, 8 connections: "
                                "the cost of passing the bundle on"},
    "bundle-gzip": {"tool": "wrk", "conns": 8, "path": BUNDLE_PATH, "coding": "gzip",
                    "headers": ["Accept-Encoding: gzip"],
                    "what": "GET /bundle.js, Accept-Encoding: gzip, 8 connections"},
    "bundle-br": {"tool": "wrk", "conns": 8, "path": BUNDLE_PATH, "coding": "br",
                  "headers": ["Accept-Encoding: br"],
                  "what": "GET /bundle.js, Accept-Encoding: br, 8 connections"},
    "bundle-zstd": {"tool": "wrk", "conns": 8, "path": BUNDLE_PATH, "coding": "zstd",
                    "headers": ["Accept-Encoding: zstd"],
                    "what": "GET /bundle.js, Accept-Encoding: zstd, 8 connections"},
    "small-ae-c64": {"tool": "wrk", "conns": 64, "path": "/", "coding": None,
                     "headers": ["Accept-Encoding: gzip, br"],
                     "what": "GET / (3 bytes, below every minimum length), "
                             "Accept-Encoding: gzip, br, 64 keep-alive connections"},
}
# The proxies of the --compression rounds: (name, proxy, its compression setting, label,
# its bundle scenarios). fairway's setting is its [compression] level (None: no
# [compression] section), nginx's its gzip_comp_level (None: gzip off). The small answers
# are measured apart, in pairs (SMALL_PAIRS).
COMP_TARGETS = [
    ("fairway", "fairway", None, "fairway, no [compression]", ["bundle-identity"]),
    ("nginx", "nginx", None, "nginx, gzip off", ["bundle-identity"]),
    ("fairway-default", "fairway", "default", "fairway, [compression] enabled = true",
     ["bundle-gzip", "bundle-br", "bundle-zstd"]),
    ("nginx-gzip1", "nginx", 1, "nginx, gzip on, gzip_comp_level 1", ["bundle-gzip"]),
    ("fairway-fastest", "fairway", "fastest", 'fairway, level = "fastest"',
     ["bundle-gzip", "bundle-br", "bundle-zstd"]),
    ("nginx-gzip6", "nginx", 6, "nginx, gzip on, gzip_comp_level 6", ["bundle-gzip"]),
]
# fairway's levels per coding (docs/configuration.md, "Levels"), for the tables.
FAIRWAY_LEVELS = {"fastest": {"gzip": 1, "br": 1, "zstd": 1},
                  "default": {"gzip": 6, "br": 5, "zstd": 3}}


def comp_level(name, coding):
    """How a --compression target compresses `coding`, as the tables say it."""
    if name.startswith("nginx-gzip"):
        return "gzip_comp_level %s" % name[len("nginx-gzip"):]
    if name.startswith("fairway-") and coding:
        level = name[len("fairway-"):]
        return '"%s" (%s %d)' % (level, coding, FAIRWAY_LEVELS[level][coding])
    return "no compression"


def scenario(name):
    return SCENARIOS[name] if name in SCENARIOS else COMP_SCENARIOS[name]

INSTALL_HINTS = {
    "nginx": "Debian/Ubuntu: sudo apt-get install nginx   (needs the stub_status module, "
             "which Debian's package has)",
    "haproxy": "Debian/Ubuntu: sudo apt-get install haproxy",
    "wrk": "Debian/Ubuntu: sudo apt-get install wrk",
    "oha": "cargo install oha --locked   (optional: without it the fixed-rate latency "
           "scenario is skipped)",
    "h2load": "Debian/Ubuntu: sudo apt-get install nghttp2-client   (optional: without it "
              "the h2c scenario is skipped)",
}


class SetupError(Exception):
    """Exit status 2: a tool is missing, a port is busy, a proxy did not start."""


# --------------------------------------------------------------------------- processes

_libc = None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:
    pass


def _child_setup():
    # Runs in the child between fork and exec: own session (so own process group),
    # and SIGTERM when the harness dies, even by SIGKILL.
    os.setsid()
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Children:
    """Every long-lived child, each in its own process group; stopped by pgid on exit."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, log_path, env=None, cwd=None):
        log = open(log_path, "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             env=env, cwd=cwd, preexec_fn=_child_setup, close_fds=True)
        log.close()
        p.name = name
        p.log_path = log_path
        self.procs.append(p)
        return p

    def stop(self, p, grace=5.0):
        if p in self.procs:
            self.procs.remove(p)
        pgid = p.pid  # setsid() made the child its group leader
        # SIGTERM first; then SIGKILL, as the leader may be gone while members (nginx
        # workers) linger.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass

    def stop_all(self):
        for p in reversed(list(self.procs)):
            self.stop(p)


def run_bounded(argv, timeout, env=None):
    """A load-generator run: own process group, killed (group) if it overruns."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, preexec_fn=_child_setup)
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        raise


# --------------------------------------------------------------------------- /proc

def read_file(path):
    with open(path) as f:
        return f.read()


def proc_tree(root):
    """root and all its descendants (nginx: master + workers)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = read_file("/proc/%s/stat" % d)
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_split(pids):
    """(utime, stime) of the given processes (all threads), in seconds."""
    user = system = 0
    for pid in pids:
        try:
            f = read_file("/proc/%d/stat" % pid)
        except OSError:
            continue
        fields = f[f.rfind(")") + 2:].split()
        user += int(fields[11])  # utime (field 14)
        system += int(fields[12])  # stime (field 15)
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids):
    """utime + stime of the given processes (all threads), in seconds."""
    return sum(cpu_split(pids))


def proc_kib(pids, name, key):
    """Sum over pids of the kB value of `key` in /proc/PID/`name`; gone processes count 0."""
    total = 0
    for pid in pids:
        try:
            for line in read_file("/proc/%d/%s" % (pid, name)).splitlines():
                if line.startswith(key):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


def rss_kib(pids):
    return proc_kib(pids, "status", "VmRSS:")


def pss_kib(pids):
    return proc_kib(pids, "smaps_rollup", "Pss:")


def machine_busy_seconds():
    """CPU time spent busy by the whole machine (all CPUs), from /proc/stat."""
    v = [int(x) for x in read_file("/proc/stat").splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = v[:7]
    steal = v[7] if len(v) > 7 else 0
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def children_cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class RssSampler(threading.Thread):
    """Sum of VmRSS (and Pss) of a fixed set of processes, every `interval` s."""

    def __init__(self, pids, interval=0.25):
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.samples = []
        self.pss_peak = 0
        self._halt = threading.Event()

    def run(self):
        while True:
            self.samples.append(rss_kib(self.pids))
            self.pss_peak = max(self.pss_peak, pss_kib(self.pids))
            if self._halt.wait(self.interval):
                break

    def finish(self):
        self._halt.set()
        self.join(5)
        self.samples.append(rss_kib(self.pids))
        return {"rss_start_kib": self.samples[0], "rss_peak_kib": max(self.samples),
                "rss_end_kib": self.samples[-1], "pss_peak_kib": self.pss_peak,
                "rss_samples": len(self.samples)}


# --------------------------------------------------------------------------- HTTP helpers

def http_get(port, path, timeout=3.0, headers=None):
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        c.close()


def stub_status(port):
    """(accepts, requests) of the backend nginx; None if unreadable."""
    try:
        st, _, body = http_get(port, "/")
        m = re.search(r"accepts handled requests\s+(\d+)\s+(\d+)\s+(\d+)", body.decode())
        if st == 200 and m:
            return int(m.group(1)), int(m.group(3))
    except (OSError, http.client.HTTPException):
        pass
    return None


def port_busy(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((HOST, port))
        return False
    except OSError:
        return True
    finally:
        s.close()


def wait_listening(port, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def log_tail(path, n=15):
    try:
        lines = read_file(path).splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + x for x in lines[-n:]) or "    (empty log)"


# --------------------------------------------------------------------------- tools

def find_tool(name):
    extra = ["/usr/sbin", "/sbin", "/usr/local/sbin", os.path.expanduser("~/.cargo/bin")]
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(extra)
    return shutil.which(name, path=path)


def tool_version(argv):
    try:
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10)
        return r.stdout.decode("utf-8", "replace").strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


def check_tools(args, proxies, scenarios):
    tools, missing, notes = {}, [], []
    need = ["nginx", "wrk"] + (["haproxy"] if "haproxy" in proxies else [])
    for t in need:
        tools[t] = find_tool(t)
        if not tools[t]:
            missing.append(t)
    for t in ("oha", "h2load"):
        tools[t] = find_tool(t)
    if missing:
        msg = ["missing required tool(s): " + ", ".join(missing)]
        msg += ["  %-8s %s" % (t, INSTALL_HINTS[t]) for t in missing]
        if len(missing) > 1 and all(t in ("nginx", "haproxy", "wrk") for t in missing):
            msg.append("  all at once: sudo apt-get install " + " ".join(missing))
        raise SetupError("\n".join(msg))
    if "latency-10k" in scenarios and not tools["oha"]:
        notes.append("oha not found: skipping latency-10k. To get it: " + INSTALL_HINTS["oha"])
        scenarios.remove("latency-10k")
    if "h2-c8x8" in scenarios and not tools["h2load"]:
        notes.append("h2load not found: skipping h2-c8x8. To get it: " + INSTALL_HINTS["h2load"])
        scenarios.remove("h2-c8x8")
    nv = tool_version([tools["nginx"], "-V"])
    full = subprocess.run([tools["nginx"], "-V"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT).stdout.decode()
    if "stub_status" not in full:
        raise SetupError("this nginx has no stub_status module (needed to count upstream "
                         "connections). " + INSTALL_HINTS["nginx"])
    versions = {"nginx": nv, "wrk": tool_version([tools["wrk"], "-v"])}
    if tools.get("haproxy"):
        versions["haproxy"] = tool_version([tools["haproxy"], "-v"])
    if tools["oha"]:
        versions["oha"] = tool_version([tools["oha"], "--version"])
        helptext = subprocess.run([tools["oha"], "--help"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT).stdout.decode()
        tools["oha_json"] = ["-j"] if re.search(r"(^|\s)-j[,\s]", helptext) \
            else ["--output-format", "json"]
    if tools["h2load"]:
        versions["h2load"] = tool_version([tools["h2load"], "--version"])
    return tools, versions, notes


def prepare_fairway(path, run_dir):
    """Copy the binary into the run dir so that a concurrent `cargo build` cannot swap it
    mid-run. Retries while the file is being rewritten."""
    cand = path
    if not os.path.isabs(cand) and not os.path.exists(cand):
        cand = os.path.join(REPO, path)
    if not os.path.exists(cand):
        raise SetupError("fairway binary not found at %s. Build it first:\n"
                         "  cargo build --release      (in %s)\n"
                         "or point at one with --fairway PATH" % (path, REPO))
    dst = os.path.join(run_dir, "fairway")
    last = None
    for _ in range(30):
        try:
            st1 = os.stat(cand)
            if time.time() - st1.st_mtime < 1.0:  # being written right now
                time.sleep(1.0)
                continue
            shutil.copyfile(cand, dst)
            os.chmod(dst, 0o755)
            st2 = os.stat(cand)
            if (st1.st_size, st1.st_mtime_ns, st1.st_ino) != \
                    (st2.st_size, st2.st_mtime_ns, st2.st_ino):
                time.sleep(1.0)
                continue
            r = subprocess.run([dst, "--version"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=10)
            if r.returncode == 0:
                return dst, os.path.abspath(cand), r.stdout.decode().strip()
            last = r.stdout.decode().strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            last = str(e)
        time.sleep(1.0)
    raise SetupError("could not take a stable copy of %s (is it being rebuilt?): %s"
                     % (cand, last))


# --------------------------------------------------------------------------- configs

class Ports:
    def __init__(self, base):
        self.backends = [base + 1, base + 2, base + 3]
        self.stub = base + 4
        self.sink = base + 5
        self.nginx = base + 10
        self.nginx_h2 = base + 11
        self.haproxy = base + 20
        self.fairway = base + 30
        self.fairway_admin = base + 31

    def all(self, proxies, big):
        ps = self.backends + [self.stub] + ([self.sink] if big else [])
        if "nginx" in proxies:
            ps += [self.nginx, self.nginx_h2]
        if "haproxy" in proxies:
            ps += [self.haproxy]
        if "fairway" in proxies:
            ps += [self.fairway, self.fairway_admin]
        return ps


def nginx_common(run_dir, name):
    t = os.path.join(run_dir, "tmp-" + name)
    return f"""daemon off;
pid {run_dir}/{name}.pid;
error_log {run_dir}/{name}-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
""", f"""    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {t}/client;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
"""


def backend_conf(run_dir, ports, big, buffered_upload=False, bundle=False):
    """buffered_upload adds /buffered/upload: the backend reads the whole request body
    (any framing), then passes it to the sink with a Content-Length (see profile.py).
    bundle adds /bundle.js, the JavaScript bundle of --compression, sent as it is (the
    backend never compresses)."""
    main, http = nginx_common(run_dir, "backend")
    servers = []
    for i, p in enumerate(ports.backends, 1):
        extra = ""
        if bundle:
            extra += f"""
        location = {BUNDLE_PATH} {{
            default_type application/javascript;
            alias {run_dir}/bundle.js;
        }}"""
        if buffered_upload:
            extra += f"""
        location = /buffered/upload {{
            client_max_body_size 0;
            client_body_buffer_size 2m;
            proxy_request_buffering on;
            proxy_http_version 1.1;
            proxy_pass http://{HOST}:{ports.sink};
        }}"""
        if big:
            extra += f"""
        location = /big/download {{ alias {run_dir}/big.bin; }}
        location = /big/upload {{
            client_max_body_size 0;
            proxy_request_buffering off;
            proxy_http_version 1.1;
            proxy_pass http://{HOST}:{ports.sink};
        }}"""
        servers.append(f"""    server {{
        listen {HOST}:{p};
        add_header X-Upstream b{i} always;
        location / {{ return 200 "ok\\n"; }}
        location = /16k {{ alias {run_dir}/16k.bin; }}{extra}
    }}""")
    return f"""# fairway load comparison: backend (three static upstreams + stub_status)
worker_processes 1;
{main}http {{
{http}    sendfile on;
{chr(10).join(servers)}
    server {{
        listen {HOST}:{ports.stub};
        location / {{ stub_status; }}
    }}
}}
"""


def nginx_proxy_conf(run_dir, ports, with_h2, gzip_level=None):
    """gzip_level (--compression): gzip on at that gzip_comp_level, for the bundle's
    application/javascript and the small text/plain answer (text/html is always in
    gzip_types); gzip_min_length stays at its default, 20 bytes."""
    main, http = nginx_common(run_dir, "nginx-proxy")
    ups = "\n".join(f"        server {HOST}:{p};" for p in ports.backends)
    h2 = f"\n        listen {HOST}:{ports.nginx_h2} http2;" if with_h2 else ""
    gz = ""
    if gzip_level is not None:
        gz = f"""    gzip on;
    gzip_comp_level {gzip_level};
    gzip_types text/plain application/javascript;
"""
    return f"""# fairway load comparison: nginx as the proxy
worker_processes auto;
{main}http {{
{http}{gz}    upstream app {{
{ups}
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{ports.nginx};{h2}
        client_max_body_size 0;
        proxy_request_buffering off;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
        }}
    }}
}}
"""


def haproxy_conf(ports):
    # Each proxied connection needs two fds; stay inside the fd limit haproxy inherits.
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    maxconn = 20000 if soft == resource.RLIM_INFINITY else max(2000, min(20000, (soft - 200) // 2))
    srv = "\n".join(f"    server s{i} {HOST}:{p} check inter 2s"
                    for i, p in enumerate(ports.backends, 1))
    return f"""# fairway load comparison: HAProxy as the proxy
global
    nbthread 2
    maxconn {maxconn}

defaults
    mode http
    timeout connect 5s
    timeout client 75s
    timeout server 75s
    timeout http-keep-alive 75s

frontend fe
    bind {HOST}:{ports.haproxy}
    maxconn {maxconn}
    option forwardfor
    http-request set-header X-Real-IP %[src]
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend app

backend app
    balance roundrobin
    http-reuse always
    option httpchk GET /
{srv}
"""


def fairway_conf(ports, compression=None):
    """compression (--compression): "default" adds `[compression] enabled = true` with
    every other key at its default; "fastest" adds `level = "fastest"` as well."""
    srv = ", ".join(f'"{HOST}:{p}"' for p in ports.backends)
    comp = ""
    if compression == "default":
        comp = """
[compression]
enabled = true
"""
    elif compression is not None:
        comp = f"""
[compression]
enabled = true
level = "{compression}"
"""
    return f"""# fairway load comparison: fairway as users run it (admin listener, metrics,
# active health checks on)
[server]
listen = "{HOST}:{ports.fairway}"

[admin]
listen = "{HOST}:{ports.fairway_admin}"

[upstreams.app]
balance = "round_robin"
servers = [{srv}]

[upstreams.app.health_check]
path = "/"
interval = "2s"
{comp}"""


# --------------------------------------------------------------------------- proxies

class Proxy:
    def __init__(self, name, port, h2_port, argv, conf_text, conf_path, check_argv, env=None):
        self.name, self.port, self.h2_port = name, port, h2_port
        self.argv, self.conf_text, self.conf_path = argv, conf_text, conf_path
        self.check_argv, self.env = check_argv, env
        self.proc = None

    def pids(self):
        return proc_tree(self.proc.pid)


def make_proxies(names, run_dir, ports, tools, fairway_bin, with_h2):
    out = {}
    for name in names:
        if name == "nginx":
            conf = os.path.join(run_dir, "nginx-proxy.conf")
            text = nginx_proxy_conf(run_dir, ports, with_h2)
            base = [tools["nginx"], "-p", run_dir + "/", "-e",
                    os.path.join(run_dir, "nginx-proxy-error.log"), "-c", conf]
            out[name] = Proxy(name, ports.nginx, ports.nginx_h2, base, text, conf, base + ["-t"])
        elif name == "haproxy":
            conf = os.path.join(run_dir, "haproxy.cfg")
            out[name] = Proxy(name, ports.haproxy, ports.haproxy,
                              [tools["haproxy"], "-db", "-f", conf], haproxy_conf(ports), conf,
                              [tools["haproxy"], "-c", "-q", "-f", conf])
        elif name == "fairway":
            conf = os.path.join(run_dir, "fairway.toml")
            env = dict(os.environ, RUST_LOG="warn")
            out[name] = Proxy(name, ports.fairway, ports.fairway,
                              [fairway_bin, "-c", conf], fairway_conf(ports), conf,
                              [fairway_bin, "check", "-c", conf], env)
    write_and_check(out.values())
    return out


def write_and_check(proxies):
    """Writes each proxy's config and has the proxy check it."""
    for p in proxies:
        with open(p.conf_path, "w") as f:
            f.write(p.conf_text)
        r = subprocess.run(p.check_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=p.env, timeout=30)
        if r.returncode != 0:
            raise SetupError("%s rejects its generated config %s:\n%s"
                             % (p.name, p.conf_path, r.stdout.decode("utf-8", "replace")))


def make_comp_targets(names, run_dir, ports, tools, fairway_bin):
    """The proxies of the --compression rounds (COMP_TARGETS) whose kind is in `names`:
    nginx's on nginx's port, fairway's on fairway's; one runs at a time."""
    out = {}
    for name, kind, setting, label, scens in COMP_TARGETS:
        if kind not in names:
            continue
        if kind == "nginx":
            conf = os.path.join(run_dir, "compression-%s.conf" % name)
            base = [tools["nginx"], "-p", run_dir + "/", "-e",
                    os.path.join(run_dir, "nginx-proxy-error.log"), "-c", conf]
            px = Proxy(name, ports.nginx, ports.nginx, base,
                       nginx_proxy_conf(run_dir, ports, False, setting), conf, base + ["-t"])
        else:
            conf = os.path.join(run_dir, "compression-%s.toml" % name)
            px = Proxy(name, ports.fairway, ports.fairway, [fairway_bin, "-c", conf],
                       fairway_conf(ports, setting), conf, [fairway_bin, "check", "-c", conf],
                       dict(os.environ, RUST_LOG="warn"))
        px.label, px.scenarios = label, scens
        out[name] = px
    write_and_check(out.values())
    return out


def preflight(port, body16k, label, spread=True):
    """The proxy answers, passes bodies intact and reaches all three backends."""
    deadline = time.monotonic() + 10
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            st, _, body = http_get(port, "/")
            if st != 200 or body != b"ok\n":
                last = "GET / -> %s %r" % (st, body[:80])
                raise ValueError
            st, _, body = http_get(port, "/16k")
            if st != 200 or body != body16k:
                last = "GET /16k -> %s, %d bytes (want 200, %d intact bytes)" % (
                    st, len(body), len(body16k))
                raise ValueError
            if not spread:
                return
            seen = set()
            for _ in range(12):
                seen.add(http_get(port, "/")[1].get("x-upstream"))
            if seen >= {"b1", "b2", "b3"}:
                return
            last = "reached only backends %s of b1,b2,b3" % sorted(x for x in seen if x)
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(0.3)
    raise SetupError("%s (port %d) fails its preflight check: %s" % (label, port, last))


# --------------------------------------------------------------------------- load tools

WRK_LUA = r"""-- written by benches/load/compare.py: one JSON line with wrk's summary
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"p999_us":%.1f,' ..
    '"mean_us":%.1f,"max_us":%.1f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def run_wrk(tools, lua, port, sc, duration):
    argv = [tools["wrk"], "-t1", "-c%d" % sc["conns"], "-d%ds" % duration, "--timeout", "5s",
            "-s", lua]
    if sc.get("close"):
        argv += ["-H", "Connection: close"]
    for h in sc.get("headers", ()):
        argv += ["-H", h]
    argv.append("http://%s:%d%s" % (HOST, port, sc["path"]))
    rc, out, err = run_bounded(argv, duration + 30)
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if rc != 0 or line is None:
        return {"ok": False, "error": "wrk exit %d: %s" % (rc, (err or out).strip()[-400:])}
    j = json.loads(line[len("WRKJSON "):])
    dur = j["duration_us"] / 1e6
    return {"ok": True, "requests": j["requests"], "duration_s": dur, "bytes": j["bytes"],
            "rps": j["requests"] / dur if dur else 0.0,
            "p50_ms": j["p50_us"] / 1000, "p90_ms": j["p90_us"] / 1000,
            "p99_ms": j["p99_us"] / 1000, "p999_ms": j["p999_us"] / 1000,
            "mean_ms": j["mean_us"] / 1000, "max_ms": j["max_us"] / 1000,
            "errors": j["errors"], "error_count": sum(j["errors"].values()),
            "argv": argv}


def run_idle(port, sc):
    """Opens sc["conns"] connections one after another, each with one GET answered before the
    next opens (the upstreams see one request at a time), then holds them all idle for
    sc["hold"] seconds (the RSS sampler runs meanwhile) and closes them."""
    n, socks, answered, t0 = sc["conns"], [], 0, time.monotonic()
    request = ("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (sc["path"], HOST)).encode()
    try:
        for _ in range(n):
            try:
                s = socket.create_connection((HOST, port), timeout=5)
            except OSError:
                break
            socks.append(s)
            data = b""
            try:
                s.sendall(request)
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            answered += data.startswith(b"HTTP/1.1 200")
        time.sleep(sc["hold"])
    finally:
        for s in socks:
            s.close()
    dur = time.monotonic() - t0
    return {"ok": answered == n, "requests": answered, "duration_s": dur,
            "errors": {"unanswered": n - answered} if answered < n else {},
            "error_count": n - answered,
            **({} if answered == n else
               {"error": "%d of %d connections got no 200" % (n - answered, n)})}


def run_oha(tools, port, sc, duration):
    argv = [tools["oha"], "-z", "%ds" % duration, "-c", str(sc["conns"]), "-q", str(sc["rate"]),
            "--latency-correction", "--no-tui"] + tools["oha_json"] + \
           ["http://%s:%d%s" % (HOST, port, sc["path"])]
    rc, out, err = run_bounded(argv, duration + 30)
    try:
        j = json.loads(out)
    except ValueError:
        return {"ok": False, "error": "oha exit %d: %s" % (rc, (err or out).strip()[-400:])}
    s, lp = j.get("summary", {}), j.get("latencyPercentiles", {})
    codes = {str(k): v for k, v in (j.get("statusCodeDistribution") or {}).items()}
    errs = dict(j.get("errorDistribution") or {})
    # Requests still in flight when -z runs out are cut off by oha itself: not errors.
    cut = sum(v for k, v in errs.items() if "deadline" in k)
    errs = {k: v for k, v in errs.items() if "deadline" not in k}
    requests = sum(codes.values())
    bad_status = sum(v for k, v in codes.items() if not k.startswith("2"))

    def ms(key):
        v = lp.get(key)
        return None if v is None else v * 1000

    return {"ok": rc == 0, "requests": requests, "duration_s": float(duration),
            "rps": s.get("requestsPerSec") or 0.0,
            "p50_ms": ms("p50"), "p90_ms": ms("p90"), "p99_ms": ms("p99"),
            "p999_ms": ms("p99.9"),
            "mean_ms": (s.get("average") or 0) * 1000, "max_ms": (s.get("slowest") or 0) * 1000,
            "errors": {"status": bad_status, "other": sum(errs.values()),
                       "detail": errs},
            "cut_at_deadline": cut,
            "error_count": bad_status + sum(errs.values()), "argv": argv}


def percentile(sorted_vals, p):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def run_h2load(tools, port, sc, duration, run_dir):
    log = os.path.join(run_dir, "scratch", "h2load-requests.log")
    if os.path.exists(log):
        os.unlink(log)
    argv = [tools["h2load"], "-t1", "-c", str(sc["conns"]), "-m", str(sc["streams"]),
            "-D", str(duration), "--log-file=" + log,
            "http://%s:%d%s" % (HOST, port, sc["path"])]
    rc, out, err = run_bounded(argv, duration + 30)
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    fin = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    if rc != 0 or not m or not fin:
        return {"ok": False, "error": "h2load exit %d: %s" % (rc, (err or out).strip()[-400:])}
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    durs = []
    try:
        with open(log) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    durs.append(int(parts[2]) / 1000.0)  # µs -> ms
    except OSError:
        pass
    durs.sort()
    succeeded, failed, errored, timeout = (int(m.group(i)) for i in (4, 5, 6, 7))
    bad_status = (int(codes.group(3)) + int(codes.group(4))) if codes else 0
    secs = float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1)
    return {"ok": True, "requests": succeeded, "duration_s": secs,
            "rps": float(fin.group(3)),
            "p50_ms": percentile(durs, 50), "p90_ms": percentile(durs, 90),
            "p99_ms": percentile(durs, 99), "p999_ms": percentile(durs, 99.9),
            "mean_ms": statistics.fmean(durs) if durs else None,
            "max_ms": durs[-1] if durs else None,
            "errors": {"failed": failed, "errored": errored, "timeout": timeout,
                       "status": bad_status},
            "error_count": failed + errored + timeout + bad_status, "argv": argv}


# --------------------------------------------------------------------------- big transfers

def sink_main(port):
    """Hidden mode (--_sink PORT): an upload sink. Reads a whole request body
    (Content-Length or chunked) and answers with the number of bytes it read."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((HOST, port))
    srv.listen(128)

    def handle(c):
        try:
            c.settimeout(60)
            f = c.makefile("rb", buffering=1 << 20)
            hdrs = {}
            f.readline()  # request line
            while True:
                line = f.readline(65536)
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.partition(b":")
                hdrs[k.strip().lower()] = v.strip()
            scratch = memoryview(bytearray(1 << 20))

            def drain(n):
                got = 0
                while got < n:
                    k = f.readinto(scratch[:min(len(scratch), n - got)])
                    if not k:
                        break
                    got += k
                return got

            if b"content-length" in hdrs:
                got = drain(int(hdrs[b"content-length"]))
            else:  # chunked
                got = 0
                while True:
                    size = int(f.readline(4096).split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while f.readline(65536) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    got += drain(size)
                    f.readline(16)  # CRLF after the chunk
            body = str(got).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                      b"Connection: close\r\n\r\n%s" % (len(body), body))
        except (OSError, ValueError):
            pass
        finally:
            c.close()

    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def _read_response(s, limit_body=None):
    """Read status line + headers; returns (status, headers, leftover)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise OSError("connection closed before the response head")
        buf += d
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        hdrs[k.strip().lower().decode()] = v.strip().decode()
    return status, hdrs, rest


def big_upload(port, size, deadline_s):
    s = socket.create_connection((HOST, port), timeout=30)
    try:
        t0 = time.monotonic()
        s.sendall(b"POST /big/upload HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: "
                  b"application/octet-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                  % (HOST.encode(), port, size))
        chunk = memoryview(bytes(1 << 20))
        left = size
        while left > 0:
            if time.monotonic() - t0 > deadline_s:
                raise OSError("upload exceeded %d s" % deadline_s)
            n = min(left, len(chunk))
            s.sendall(chunk[:n])
            left -= n
        status, hdrs, rest = _read_response(s)
        want = int(hdrs.get("content-length", "0"))
        while len(rest) < want:
            d = s.recv(65536)
            if not d:
                break
            rest += d
        secs = time.monotonic() - t0
        got = int(rest.strip() or b"-1") if status == 200 else -1
        if status != 200 or got != size:
            return {"ok": False, "error": "status %d, sink got %d of %d bytes"
                    % (status, got, size), "seconds": secs}
        return {"ok": True, "seconds": secs, "bytes": size}
    finally:
        s.close()


def big_download(port, size, deadline_s):
    s = socket.create_connection((HOST, port), timeout=30)
    try:
        t0 = time.monotonic()
        s.sendall(b"GET /big/download HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n"
                  % (HOST.encode(), port))
        status, hdrs, rest = _read_response(s)
        want = int(hdrs.get("content-length", "-1"))
        got = len(rest)
        buf = bytearray(1 << 20)
        while got < want or (want < 0):
            if time.monotonic() - t0 > deadline_s:
                raise OSError("download exceeded %d s" % deadline_s)
            n = s.recv_into(buf)
            if not n:
                break
            got += n
        secs = time.monotonic() - t0
        if status != 200 or got != size:
            return {"ok": False, "error": "status %d, got %d of %d bytes" % (status, got, size),
                    "seconds": secs}
        return {"ok": True, "seconds": secs, "bytes": size}
    finally:
        s.close()


# --------------------------------------------------------------------------- measurement

class Bench:
    def __init__(self, args, tools, run_dir, ports, backend_proc, body16k):
        self.args, self.tools, self.run_dir, self.ports = args, tools, run_dir, ports
        self.backend = backend_proc
        self.body16k = body16k
        self.lua = os.path.join(run_dir, "report.lua")
        with open(self.lua, "w") as f:
            f.write(WRK_LUA)

    def backend_pids(self):
        return proc_tree(self.backend.pid)

    def measure(self, target, scen, rnd, probes=()):
        """One run of one scenario against one target (a Proxy, or None = direct).
        `probes` (used by profile.py) are started on the proxy's processes just before the
        load and finished just after it; each adds its own numbers to the result."""
        sc = scenario(scen)
        port = self.ports.backends[0] if target is None else (
            target.h2_port if sc["tool"] == "h2load" else target.port)
        ppids = target.pids() if target else []
        bpids = self.backend_pids()
        for probe in probes:
            probe.start(ppids)
        stub0 = stub_status(self.ports.stub)
        (user0, sys0), bcpu0 = cpu_split(ppids), cpu_seconds(bpids)
        ch0, self0, busy0, t0 = (children_cpu_seconds(), self_cpu_seconds(),
                                 machine_busy_seconds(), time.monotonic())
        sampler = RssSampler(ppids)
        sampler.start()
        try:
            if sc["tool"] == "wrk":
                res = run_wrk(self.tools, self.lua, port, sc, self.args.duration)
            elif sc["tool"] == "oha":
                res = run_oha(self.tools, port, sc, self.args.duration)
            elif sc["tool"] == "idle":
                res = run_idle(port, sc)
            else:
                res = run_h2load(self.tools, port, sc, self.args.duration, self.run_dir)
        finally:
            mem = sampler.finish()
        wall = time.monotonic() - t0
        (user1, sys1), bcpu1 = cpu_split(ppids), cpu_seconds(bpids)
        ch1, self1, busy1 = children_cpu_seconds(), self_cpu_seconds(), machine_busy_seconds()
        stub1 = stub_status(self.ports.stub)
        res.update({"round": rnd, "proxy": target.name if target else "direct",
                    "scenario": scen, "wall_s": wall, **mem})
        res.setdefault("errors", {})
        res.setdefault("error_count", 0)
        for probe in probes:
            probe.finish(res)
        proxy_cpu = (user1 - user0) + (sys1 - sys0)
        backend_cpu, loadgen_cpu = bcpu1 - bcpu0, ch1 - ch0
        busy = busy1 - busy0
        other = busy - proxy_cpu - backend_cpu - loadgen_cpu - (self1 - self0)
        res.update({"proxy_cpu_s": proxy_cpu, "proxy_user_s": user1 - user0,
                    "proxy_sys_s": sys1 - sys0, "backend_cpu_s": backend_cpu,
                    "loadgen_cpu_s": loadgen_cpu, "harness_cpu_s": self1 - self0,
                    "machine_busy_s": busy, "other_cpu_s": other,
                    "machine_busy_pct": 100.0 * busy / (wall * (os.cpu_count() or 1))})
        reqs = res.get("requests") or 0
        if reqs:
            res["proxy_cpu_per_100k"] = proxy_cpu / reqs * 1e5
            res["backend_cpu_per_100k"] = backend_cpu / reqs * 1e5
            res["loadgen_cpu_per_100k"] = loadgen_cpu / reqs * 1e5
        if stub0 and stub1:
            # The "after" read's own connection is counted in accepts; subtract it.
            res["upstream_conns"] = stub1[0] - stub0[0] - 1
            res["upstream_requests"] = stub1[1] - stub0[1] - 1
        if target is None:
            res["proxy_cpu_s"] = res["proxy_user_s"] = res["proxy_sys_s"] = None
            res.pop("proxy_cpu_per_100k", None)
        res["contaminated"] = other > 0.15 * wall
        return res

    def measure_big(self, target, kind, rnd):
        port = self.ports.backends[0] if target is None else target.port
        ppids = target.pids() if target else []
        cpu0 = cpu_seconds(ppids)
        sampler = RssSampler(ppids)
        sampler.start()
        size = self.args.big_size
        try:
            fn = big_upload if kind == "upload-big" else big_download
            try:
                res = fn(port, size, self.args.big_timeout)
            except OSError as e:
                res = {"ok": False, "error": str(e)}
        finally:
            mem = sampler.finish()
        cpu = cpu_seconds(ppids) - cpu0
        res.update({"round": rnd, "proxy": target.name if target else "direct",
                    "scenario": kind, "bytes": size, **mem})
        if res.get("seconds"):
            res["mib_per_s"] = size / res["seconds"] / (1 << 20)
        if target is not None:
            res["proxy_cpu_s"] = cpu
            res["proxy_cpu_per_gib"] = cpu / (size / (1 << 30))
            res["rss_growth_kib"] = mem["rss_peak_kib"] - mem["rss_start_kib"]
        return res


# --------------------------------------------------------------------------- report

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, kind):
    if v is None:
        return "–"
    if kind == "rps":
        return "{:,.0f}".format(v)
    if kind == "ms":
        return "%.3f" % v if v < 1 else ("%.2f" % v if v < 100 else "%.0f" % v)
    if kind == "cpu":
        return "%.2f" % v
    if kind == "mib":
        return "%.1f" % (v / 1024.0)
    if kind == "int":
        return "%g" % v
    if kind == "ratio":
        return "%.2f" % v
    if kind == "ms1":
        return "%.1f" % v
    return str(v)


def summarize(runs, proxies, scenarios):
    """Medians per (scenario, proxy) and fairway's per-round ratios."""
    table, ratios = [], []
    for scen in scenarios:
        for px in proxies:
            rs = [r for r in runs if r["scenario"] == scen and r["proxy"] == px]
            if not rs:
                continue
            good = [r for r in rs if r.get("ok")]
            table.append({
                "scenario": scen, "proxy": px, "runs": len(rs), "ok_runs": len(good),
                "rps": med([r.get("rps") for r in good]),
                "p50_ms": med([r.get("p50_ms") for r in good]),
                "p99_ms": med([r.get("p99_ms") for r in good]),
                "proxy_cpu_per_100k": med([r.get("proxy_cpu_per_100k") for r in good]),
                "rss_peak_kib": med([r.get("rss_peak_kib") for r in good]),
                "upstream_conns": med([r.get("upstream_conns") for r in good]),
                "errors": sum(r.get("error_count", 0) for r in rs),
                "failed": len(rs) - len(good),
                "contaminated": sum(1 for r in rs if r.get("contaminated")),
            })
        if "fairway" not in proxies:
            continue
        metrics = [("rps", "rps"), ("p50_ms", "p50"), ("p99_ms", "p99"),
                   ("proxy_cpu_per_100k", "CPU/100k")]
        if SCENARIOS[scen].get("rate"):  # fixed rate: rps is the same for everyone
            metrics = metrics[1:]
        if scen == "conns-1000":
            metrics.append(("rss_peak_kib", "peak RSS"))
        if SCENARIOS[scen]["tool"] == "idle":
            metrics = [("rss_peak_kib", "peak RSS")]
        for key, label in metrics:
            row = {"scenario": scen, "metric": label, "key": key}
            for ref in ("nginx", "haproxy"):
                if ref not in proxies:
                    continue
                per_round = []
                for rnd in sorted({r["round"] for r in runs}):
                    f = next((r for r in runs if r["round"] == rnd and r["scenario"] == scen
                              and r["proxy"] == "fairway" and r.get("ok")), None)
                    o = next((r for r in runs if r["round"] == rnd and r["scenario"] == scen
                              and r["proxy"] == ref and r.get("ok")), None)
                    if f and o and f.get(key) and o.get(key):
                        per_round.append(f[key] / o[key])
                row[ref] = per_round
            ratios.append(row)
    return table, ratios


def print_report(table, ratios, big_runs, proxies, quick):
    out = []
    out.append("## Medians per proxy and scenario\n")
    out.append("| scenario | proxy | rps | p50 ms | p99 ms | proxy CPU s/100k | peak RSS MiB "
               "| upstream conns | errors |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in table:
        warn = ""
        if t["failed"] or t["errors"]:
            warn = " ⚠"
        if t["contaminated"]:
            warn += " ~"
        out.append("| %s | %s%s | %s | %s | %s | %s | %s | %s | %s |" % (
            t["scenario"], t["proxy"], warn, fmt(t["rps"], "rps"), fmt(t["p50_ms"], "ms"),
            fmt(t["p99_ms"], "ms"), fmt(t["proxy_cpu_per_100k"], "cpu"),
            fmt(t["rss_peak_kib"], "mib"), fmt(t["upstream_conns"], "int"),
            ("%d" % t["errors"]) + (" (%d failed runs)" % t["failed"] if t["failed"] else "")))
    if ratios:
        refs = [r for r in ("nginx", "haproxy") if r in proxies]
        out.append("\n## fairway ÷ other, per round: median (min–max)\n")
        out.append("rps: higher is better for fairway; p50, p99, CPU, RSS: lower is better.\n")
        out.append("| scenario | metric | " + " | ".join("fairway/%s" % r for r in refs) + " |")
        out.append("|---|---|" + "---:|" * len(refs))
        for row in ratios:
            cells = []
            for ref in refs:
                v = row.get(ref) or []
                if not v:
                    cells.append("–")
                elif len(v) == 1:
                    cells.append(fmt(v[0], "ratio"))
                else:
                    cells.append("%s (%s–%s)" % (fmt(statistics.median(v), "ratio"),
                                                 fmt(min(v), "ratio"), fmt(max(v), "ratio")))
            out.append("| %s | %s | %s |" % (row["scenario"], row["metric"], " | ".join(cells)))
    if big_runs:
        out.append("\n## Big transfers (medians)\n")
        out.append("| transfer | target | MiB/s | proxy RSS growth MiB | proxy CPU s/GiB | ok |")
        out.append("|---|---|---:|---:|---:|---|")
        for kind in BIG_SCENARIOS:
            for px in ["direct"] + proxies:
                rs = [r for r in big_runs if r["scenario"] == kind and r["proxy"] == px]
                if not rs:
                    continue
                good = [r for r in rs if r.get("ok")]
                out.append("| %s | %s | %s | %s | %s | %d/%d |" % (
                    kind, px, fmt(med([r.get("mib_per_s") for r in good]), "rps"),
                    fmt(med([r.get("rss_growth_kib") for r in good]), "mib"),
                    fmt(med([r.get("proxy_cpu_per_gib") for r in good]), "cpu"),
                    len(good), len(rs)))
    out.append("\n⚠ = request errors or failed runs (see the JSON); ~ = another process used "
               "CPU during a run (numbers contaminated).")
    if quick:
        out.append("--quick: one short round; ratios are indicative only.")
    print("\n".join(out))
    sys.stdout.flush()


def machine_shape():
    model, ncpu_info = "?", 0
    try:
        for line in read_file("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                ncpu_info += 1
    except OSError:
        pass
    mem = "?"
    try:
        for line in read_file("/proc/meminfo").splitlines():
            if line.startswith("MemTotal:"):
                mem = "%.1f GiB" % (int(line.split()[1]) / 1048576)
    except OSError:
        pass
    u = os.uname()
    return {"nproc": len(os.sched_getaffinity(0)), "cpus_online": os.cpu_count(),
            "cpu_model": model, "kernel": "%s %s %s" % (u.sysname, u.release, u.machine),
            "memory": mem, "loadavg": read_file("/proc/loadavg").split()[:3]}


def background_busy(seconds=1.0):
    b0, t0 = machine_busy_seconds(), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (machine_busy_seconds() - b0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))


# --------------------------------------------------------------------------- compression

def write_bundle(run_dir):
    """Writes bundle.js into the run directory: real JavaScript from this machine (the
    `.js` files under the first of JS_ROOTS that has any, then the next ones, in path
    order), concatenated as whole files, each after a `// path` line, up to BUNDLE_TARGET
    bytes (a file that would go past it is left out and the next ones tried). Without
    any, generated code stands in. Returns (the bytes, a description for the JSON)."""
    files = []
    for root in JS_ROOTS:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                path = os.path.join(dirpath, fn)
                if fn.endswith(".js") and os.path.isfile(path) and not os.path.islink(path):
                    files.append((root, path))
    out, used, roots = bytearray(), 0, []
    for root, path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        piece = b"// %s\n%s\n" % (os.path.relpath(path, root).encode(), data)
        if len(out) + len(piece) > BUNDLE_TARGET:
            continue
        out += piece
        used += 1
        if root not in roots:
            roots.append(root)
        if len(out) > BUNDLE_TARGET - 256:
            break
    if len(out) < BUNDLE_TARGET // 2:
        source, out, used, roots = "generated", generated_js(BUNDLE_TARGET), 0, []
        what = ("generated JavaScript (no .js files under %s): it compresses differently "
                "from real code" % ", ".join(JS_ROOTS))
    else:
        source = "files"
        what = "%d .js files under %s, concatenated" % (used, ", ".join(roots))
        npm = os.path.join(roots[0], "npm", "package.json")
        try:
            with open(npm) as f:
                what += " (npm %s)" % json.load(f).get("version", "?")
        except (OSError, ValueError):
            pass
    out = bytes(out)
    path = os.path.join(run_dir, "bundle.js")
    with open(path, "wb") as f:
        f.write(out)
    os.chmod(path, 0o644)
    return out, {"source": source, "what": what, "files": used, "roots": roots,
                 "bytes": len(out), "sha256": hashlib.sha256(out).hexdigest()}


def generated_js(size):
    """Stand-in JavaScript when the machine has none: functions built from a fixed list of
    identifiers by a fixed pseudo-random sequence (the same bytes every run)."""
    words = ["state", "props", "value", "index", "result", "options", "request", "response",
             "callback", "element", "handler", "config", "buffer", "length", "module",
             "exports", "require", "promise", "resolve", "reject", "error", "data", "items",
             "count", "target", "source", "render", "update", "create", "remove", "parse"]
    x, out, n = 12345, [], 0
    while n < size:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        a, b, c = words[x % 31], words[(x >> 5) % 31], words[(x >> 10) % 31]
        line = ("function %s_%d(%s, %s) {\n  const %s = %s.%s(%d);\n  if (!%s) { return "
                "null; }\n  return %s + %d;\n}\n" % (a, x % 997, b, c, a, b, c, x % 100, a,
                                                      a, x % 4096))
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def _cli_decoder(argv):
    def decode(data):
        r = subprocess.run(argv, input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=30)
        if r.returncode != 0:
            raise ValueError(r.stderr.decode("utf-8", "replace").strip()[-200:])
        return r.stdout
    return decode


def find_decoders():
    """coding -> (decode function, how) for gzip, br and zstd; (None, why) when nothing on
    this machine decodes it: Python modules when importable, else the command-line tool."""
    out = {"gzip": (gzip.decompress, "Python gzip")}
    dec = None
    try:
        brotli = importlib.import_module("brotli")
        dec = (brotli.decompress, "Python brotli module")
    except ImportError:
        if find_tool("brotli"):
            dec = (_cli_decoder([find_tool("brotli"), "-d", "-c"]), "brotli CLI")
    out["br"] = dec or (None, "no brotli module or CLI: br responses not verified")
    dec = None
    for mod in ("compression.zstd", "zstandard", "zstd"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if mod == "zstandard":
            dec = (lambda b, m=m: m.ZstdDecompressor().decompressobj().decompress(b),
                   "Python zstandard module")
        elif hasattr(m, "decompress"):
            dec = (m.decompress, "Python %s module" % mod)
        if dec:
            break
    if dec is None and find_tool("zstd"):
        dec = (_cli_decoder([find_tool("zstd"), "-d", "-c", "-q"]), "zstd CLI")
    out["zstd"] = dec or (None, "no zstd module or CLI: zstd responses not verified")
    return out


def raw_get(port, path, accept, timeout=30.0):
    """One keep-alive GET, read exactly to the end of its response: (status, headers, body
    with the chunked framing taken off, every byte the response took on the connection)."""
    s = socket.create_connection((HOST, port), timeout=timeout)
    try:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nAccept-Encoding: %s\r\n\r\n"
                  % (path.encode(), HOST.encode(), port, accept.encode()))
        f = s.makefile("rb")
        line = f.readline(65536)
        n = len(line)
        status = int(line.split()[1])
        hdrs = {}
        while True:
            line = f.readline(65536)
            n += len(line)
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.partition(b":")
            hdrs[k.strip().lower().decode()] = v.strip().decode()
        body = bytearray()
        if "chunked" in hdrs.get("transfer-encoding", "").lower():
            while True:
                line = f.readline(4096)
                n += len(line)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        line = f.readline(65536)
                        n += len(line)
                        if line in (b"\r\n", b"\n", b""):
                            break
                    break
                chunk = f.read(size)
                body += chunk
                n += len(chunk) + len(f.readline(16))
        else:
            chunk = f.read(int(hdrs.get("content-length", "0")))
            body += chunk
            n += len(chunk)
        return status, hdrs, bytes(body), n
    finally:
        s.close()


def check_coded(port, scen, bundle, decoders):
    """One request of a --compression scenario, outside any measurement: the answer must
    carry the scenario's coding (none for the small answer and identity) and decode to what
    the backend sent. Gives the size of the body on the wire and the ratio."""
    sc = COMP_SCENARIOS[scen]
    accept = sc["headers"][0].split(":", 1)[1].strip() if sc["headers"] else "identity"
    want = bundle if sc["path"] == BUNDLE_PATH else b"ok\n"
    res = {"ok": False, "accept_encoding": accept, "verified": False}
    try:
        st, hdrs, body, total = raw_get(port, sc["path"], accept)
    except (OSError, ValueError, IndexError) as e:
        res["error"] = "GET %s: %s" % (sc["path"], e)
        return res
    got = hdrs.get("content-encoding")
    res.update({"status": st, "content_encoding": got, "wire_bytes": len(body),
                "response_bytes": total, "ratio": len(want) / len(body) if body else None})
    if st != 200 or (got or None) != sc["coding"]:
        res["error"] = "GET %s with Accept-Encoding: %s -> %s, Content-Encoding %s (want 200, " \
                       "%s)" % (sc["path"], accept, st, got, sc["coding"] or "none")
        return res
    plain, how = body, "as sent"
    if sc["coding"]:
        dec, how = decoders[sc["coding"]]
        if dec is None:
            res.update({"ok": True, "verified": None, "note": how})
            return res
        try:
            plain = dec(body)
        except Exception as e:  # any decoder's error: the body is not valid in its coding
            res["error"] = "%s body of %d bytes does not decode (%s): %s" % (
                sc["coding"], len(body), how, e)
            return res
    if plain != want:
        res["error"] = "%s body decodes to %d bytes that are not the %d the backend sent" % (
            sc["coding"] or "identity", len(plain), len(want))
        return res
    res.update({"ok": True, "verified": True, "decoded_by": how})
    return res


def codec_reference(bundle):
    """The codecs alone on the bundle, in this process, one thread: the system's zlib (what
    nginx links) at levels 1 and 6 in the gzip format, and Brotli at quality 1 and 5 with
    fairway's window (2^20) when the brotli module is importable. CPU time is the best of
    3 (process CPU clock)."""
    mib = len(bundle) / (1 << 20)

    def best_of_3(fn):
        t = None
        for _ in range(3):
            t0 = time.process_time()
            out = fn()
            dt = time.process_time() - t0
            t = dt if t is None else min(t, dt)
        return out, t

    rows = []
    for level in (1, 6):
        def gz(level=level):
            c = zlib.compressobj(level, zlib.DEFLATED, 31)
            return c.compress(bundle) + c.flush()
        out, t = best_of_3(gz)
        rows.append({"codec": "zlib %s" % zlib.ZLIB_RUNTIME_VERSION, "coding": "gzip",
                     "level": level, "wire_bytes": len(out), "ratio": len(bundle) / len(out),
                     "cpu_ms_per_mib": t * 1000 / mib})
    try:
        brotli = importlib.import_module("brotli")
    except ImportError:
        brotli = None
    if brotli is not None and hasattr(brotli, "compress"):
        for q in (1, 5):
            out, t = best_of_3(lambda q=q: brotli.compress(bundle, quality=q, lgwin=20))
            rows.append({"codec": "brotli module %s" % getattr(brotli, "__version__", "?"),
                         "coding": "br", "level": q, "wire_bytes": len(out),
                         "ratio": len(bundle) / len(out), "cpu_ms_per_mib": t * 1000 / mib})
    return rows


def bundle_numbers(res, size, check):
    """Adds the per-MiB numbers of a bundle run: the bundle MiB served, proxy CPU ms per
    MiB, MiB/s, and the wire size and ratio of the slot's check.

    MiB served counts what wrk read, in bundles: its bytes ÷ the bytes one response takes
    on the connection (the check's), so that the responses still in flight when wrk stops
    count for the part of them it read (8 responses cut short of, say, 200 would otherwise
    inflate the CPU per MiB by up to 4 %). A run whose load tool read about a whole bundle
    per response was not compressed: it fails."""
    sc = COMP_SCENARIOS[res["scenario"]]
    res["ratio"], res["wire_bytes"] = check.get("ratio"), check.get("wire_bytes")
    if sc["path"] != BUNDLE_PATH or not res.get("ok"):
        return
    reqs = res.get("requests") or 0
    res["completed_mib"] = reqs * size / (1 << 20)
    mib = res["completed_mib"]
    if res.get("bytes") and check.get("response_bytes"):
        mib = res["bytes"] / check["response_bytes"] * size / (1 << 20)
    res["uncompressed_mib"] = mib
    if mib and res.get("proxy_cpu_s") is not None:
        res["proxy_cpu_ms_per_mib"] = res["proxy_cpu_s"] * 1000 / mib
    if res.get("duration_s"):
        res["mib_per_s"] = mib / res["duration_s"]
    if reqs and res.get("bytes"):
        res["read_bytes_per_response"] = res["bytes"] / reqs
        if sc["coding"] and res["read_bytes_per_response"] > 0.9 * size:
            res["ok"] = False
            res["error"] = "wrk read %d bytes per response: not compressed" % (
                res["read_bytes_per_response"])


def run_compression(args, children, tools, run_dir, bench, targets, bundle, decoders,
                    body16k):
    """The --compression rounds. Each round first measures the small answers, compression on
    against off, in adjacent runs (SMALL_PAIRS: off, on, on, off; the next round on, off,
    off, on), then gives each target a slot for its bundle scenarios (order rotated each
    round). Every run of a small answer has a slot of its own. In a slot the proxy is
    started fresh, its codings are checked with one request each, then each scenario runs
    after 1 s of the same load, unrecorded."""
    runs, checks = [], []
    order = list(targets)
    slots = [0]

    def slot(name, scens, rnd):
        px = targets[name]
        slots[0] += 1
        start_proxy(children, px, run_dir, "compression-%s-r%d-%d.log" % (name, rnd, slots[0]),
                    body16k)
        checked = {}
        for scen in scens:
            c = check_coded(px.port, scen, bundle, decoders)
            c.update({"round": rnd, "proxy": name, "scenario": scen})
            checks.append(c)
            if not c["ok"]:
                raise SetupError("%s (%s) fails the %s check: %s" % (
                    name, px.label, scen, c["error"]))
            checked[scen] = c
        for scen in scens:
            run_wrk(tools, bench.lua, px.port, COMP_SCENARIOS[scen], 1)  # warm-up
            pids = px.pids()
            cpu0 = [cpu_seconds([p]) for p in pids]
            res = bench.measure(px, scen, rnd)
            per = [cpu_seconds([p]) - c for p, c in zip(pids, cpu0)]
            # How the CPU spread: nginx's workers, or fairway's one process.
            res["proxy_cpu_per_process_s"] = sorted(per, reverse=True)
            res["busiest_process_share"] = max(per) / sum(per) if sum(per) > 0 else None
            if res.get("duration_s") and res.get("proxy_cpu_s") is not None:
                res["proxy_cores"] = res["proxy_cpu_s"] / res["duration_s"]
            bundle_numbers(res, len(bundle), checked[scen])
            runs.append(res)
            print("  %-15s %-15s %s" % (name, scen, comp_line(res)))
            sys.stdout.flush()
            after_run(px, name, scen)
        children.stop(px.proc)
        px.proc = None

    for rnd in range(1, args.rounds + 1):
        k = (rnd - 1) % len(order)
        rorder = order[k:] + order[:k]
        print("compression round %d/%d: small answers on/off, then %s" % (
            rnd, args.rounds, " ".join(rorder)))
        for _, on, off in SMALL_PAIRS:
            if on in targets and off in targets:
                for name in ([off, on, on, off] if rnd % 2 else [on, off, off, on]):
                    slot(name, ["small-ae-c64"], rnd)
        for name in rorder:
            slot(name, targets[name].scenarios, rnd)
        print()
    return runs, checks


def comp_line(r):
    if COMP_SCENARIOS[r["scenario"]]["path"] != BUNDLE_PATH:
        return run_line(r)
    if not r.get("ok"):
        return "FAILED: %s" % r.get("error")
    s = "%7s rps  %s MiB/s  cpu %s ms/MiB (%s cores)  ratio %s (%s bytes)  p50 %s ms" % (
        fmt(r.get("rps"), "rps"), fmt(r.get("mib_per_s"), "rps"),
        fmt(r.get("proxy_cpu_ms_per_mib"), "ms1"), fmt(r.get("proxy_cores"), "ratio"),
        fmt(r.get("ratio"), "ratio"), fmt(r.get("wire_bytes"), "rps"),
        fmt(r.get("p50_ms"), "ms"))
    if r.get("error_count"):
        s += "  ERRORS %s" % {k: v for k, v in r["errors"].items() if v}
    if r.get("contaminated"):
        s += "  (other CPU %.1f s)" % r["other_cpu_s"]
    return s


# Rows of the bundle table, in this order: (scenario, target).
BUNDLE_ROWS = [("bundle-identity", "nginx"), ("bundle-identity", "fairway"),
               ("bundle-gzip", "nginx-gzip1"), ("bundle-gzip", "fairway-fastest"),
               ("bundle-gzip", "nginx-gzip6"), ("bundle-gzip", "fairway-default"),
               ("bundle-br", "fairway-fastest"), ("bundle-br", "fairway-default"),
               ("bundle-zstd", "fairway-fastest"), ("bundle-zstd", "fairway-default")]
# fairway ÷ nginx at the same gzip level.
GZIP_PAIRS = [("1", "fairway-fastest", "nginx-gzip1"), ("6", "fairway-default", "nginx-gzip6")]
# Small answers below the minimum length, compression on against off: (proxy, on, off).
# Measured in adjacent runs, off-on-on-off (on-off-off-on in even rounds), so that a drift
# of the machine within a round cancels out of the round's ratio.
SMALL_PAIRS = [("fairway", "fairway-default", "fairway"), ("nginx", "nginx-gzip1", "nginx")]


def per_round(runs, scen, a, b, key):
    """a's value ÷ b's, for each round where both ran cleanly; a proxy that ran the
    scenario more than once in a round counts with the mean of its runs."""
    out = []
    for rnd in sorted({r["round"] for r in runs}):
        va, vb = ([r.get(key) for r in runs if r["round"] == rnd and r["scenario"] == scen
                   and r["proxy"] == p and r.get("ok") and r.get(key)] for p in (a, b))
        if va and vb:
            out.append(statistics.fmean(va) / statistics.fmean(vb))
    return out


def summarize_compression(runs, targets):
    rows = []
    small = [(s, t) for t in ("fairway", "fairway-default", "nginx", "nginx-gzip1")
             for s in ["small-ae-c64"]]
    for scen, name in BUNDLE_ROWS + small:
        rs = [r for r in runs if r["scenario"] == scen and r["proxy"] == name]
        if not rs:
            continue
        good = [r for r in rs if r.get("ok")]
        row = {"scenario": scen, "proxy": name, "label": targets[name].label,
               "level": comp_level(name, COMP_SCENARIOS[scen]["coding"]),
               "coding": COMP_SCENARIOS[scen]["coding"],
               "runs": len(rs), "ok_runs": len(good),
               "errors": sum(r.get("error_count", 0) for r in rs), "failed": len(rs) - len(good),
               "contaminated": sum(1 for r in rs if r.get("contaminated"))}
        for key in ("rps", "p50_ms", "p99_ms", "proxy_cpu_per_100k", "mib_per_s",
                    "proxy_cpu_ms_per_mib", "ratio", "wire_bytes", "proxy_cores"):
            row[key] = med([r.get(key) for r in good])
        if name.startswith("nginx"):
            row["one_worker_runs"] = sum(1 for r in good
                                         if (r.get("busiest_process_share") or 0) > 0.9)
        rows.append(row)
    gzip_ratios = []
    for level, f, n in GZIP_PAIRS:
        for key, label in (("proxy_cpu_ms_per_mib", "CPU ms/MiB"), ("rps", "rps"),
                           ("wire_bytes", "bytes on the wire")):
            v = per_round(runs, "bundle-gzip", f, n, key)
            if v:
                gzip_ratios.append({"level": level, "fairway": f, "nginx": n, "metric": label,
                                    "key": key, "per_round": v})
    small_ratios = []
    for who, on, off in SMALL_PAIRS:
        for key, label in (("rps", "rps"), ("p99_ms", "p99"),
                           ("proxy_cpu_per_100k", "CPU/100k")):
            v = per_round(runs, "small-ae-c64", on, off, key)
            if v:
                small_ratios.append({"proxy": who, "on": on, "off": off, "metric": label,
                                     "key": key, "per_round": v})
    return {"rows": rows, "gzip_ratios": gzip_ratios, "small_ratios": small_ratios}


def ratio_cell(v):
    if not v:
        return "–"
    if len(v) == 1:
        return fmt(v[0], "ratio")
    return "%s (%s–%s)" % (fmt(statistics.median(v), "ratio"), fmt(min(v), "ratio"),
                           fmt(max(v), "ratio"))


def print_compression_report(summary, bundle_info, reference, decoders, quick):
    out = ["## Compression: the JavaScript bundle (medians over rounds)\n",
           "%s bytes: %s. wrk -t1 -c8, one Accept-Encoding per row. ratio = the bundle's "
           "size ÷ the body on the wire (one request, decoded and compared with the bundle). "
           "CPU: the proxy's processes, per MiB of bundle served (uncompressed); cores: "
           "the proxy's CPU seconds per second.\n"
           % (fmt(bundle_info["bytes"], "rps"), bundle_info["what"]),
           "| coding | proxy, level | rps | MiB/s | proxy CPU ms/MiB | cores | ratio "
           "| bytes on the wire | p50 ms | errors |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in summary["rows"]:
        if COMP_SCENARIOS[t["scenario"]]["path"] != BUNDLE_PATH:
            continue
        who = "%s, %s" % (t["proxy"].split("-")[0], t["level"])
        out.append("| %s | %s%s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            t["coding"] or "identity", who, warn_mark(t), fmt(t["rps"], "rps"),
            fmt(t["mib_per_s"], "rps"), fmt(t["proxy_cpu_ms_per_mib"], "ms1"),
            fmt(t["proxy_cores"], "ratio"), fmt(t["ratio"], "ratio"),
            fmt(t["wire_bytes"], "rps"), fmt(t["p50_ms"], "ms"), err_cell(t)))
    one = [t for t in summary["rows"] if t.get("one_worker_runs")
           and COMP_SCENARIOS[t["scenario"]]["path"] == BUNDLE_PATH]
    if one:
        out.append("\nnginx: in %d of %d bundle runs one worker process did over 90 %% of "
                   "nginx's CPU (its 8 connections were accepted by one worker), so its rps "
                   "there is one core's; CPU per MiB does not depend on it."
                   % (sum(t["one_worker_runs"] for t in one),
                      sum(t["ok_runs"] for t in summary["rows"]
                          if t["proxy"].startswith("nginx")
                          and COMP_SCENARIOS[t["scenario"]]["path"] == BUNDLE_PATH)))
    if summary["gzip_ratios"]:
        out.append("\n## fairway ÷ nginx at the same gzip level, per round: median (min–max)\n")
        out.append("CPU and bytes: lower is better for fairway; rps: higher is better.\n")
        out.append("| gzip level | metric | fairway/nginx |")
        out.append("|---|---|---:|")
        for r in summary["gzip_ratios"]:
            out.append("| %s (%s ÷ %s) | %s | %s |" % (r["level"], r["fairway"], r["nginx"],
                                                    r["metric"], ratio_cell(r["per_round"])))
    if reference:
        out.append("\n## The codecs alone (this process, one thread, best of 3)\n")
        out.append("| codec | coding | level | CPU ms/MiB | ratio | bytes |")
        out.append("|---|---|---:|---:|---:|---:|")
        for r in reference:
            out.append("| %s | %s | %d | %s | %s | %s |" % (
                r["codec"], r["coding"], r["level"], fmt(r["cpu_ms_per_mib"], "ms1"),
                fmt(r["ratio"], "ratio"), fmt(r["wire_bytes"], "rps")))
    small = [t for t in summary["rows"] if t["scenario"] == "small-ae-c64"]
    if small:
        out.append("\n## Small answers with compression on (below the minimum length), "
                   "medians\n")
        out.append("%s.\n" % COMP_SCENARIOS["small-ae-c64"]["what"])
        out.append("| proxy | rps | p50 ms | p99 ms | proxy CPU s/100k | errors |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for t in small:
            out.append("| %s%s | %s | %s | %s | %s | %s |" % (
                t["label"], warn_mark(t), fmt(t["rps"], "rps"), fmt(t["p50_ms"], "ms"),
                fmt(t["p99_ms"], "ms"), fmt(t["proxy_cpu_per_100k"], "cpu"), err_cell(t)))
    if summary["small_ratios"]:
        out.append("\n## Compression on ÷ off, small answers, per round: median (min–max)\n")
        out.append("| proxy | metric | on/off |")
        out.append("|---|---|---:|")
        for r in summary["small_ratios"]:
            out.append("| %s (%s ÷ %s) | %s | %s |" % (r["proxy"], r["on"], r["off"],
                                                     r["metric"], ratio_cell(r["per_round"])))
        rps = next((r["per_round"] for r in summary["small_ratios"]
                    if r["proxy"] == "fairway" and r["key"] == "rps"), None)
        if rps:
            m = statistics.median(rps)
            out.append("\nRequirement, fairway's small-answer throughput with `[compression] "
                       "enabled = true` within 5 %% of without: %s (median %s, rounds %s)%s."
                       % ("met" if m >= 0.95 else "NOT met", fmt(m, "ratio"),
                          ", ".join(fmt(v, "ratio") for v in rps),
                          "; the rounds fall on both sides of 0.95, so this run does not "
                          "settle it" if min(rps) < 0.95 <= max(rps) else ""))
    notes = [how for dec, how in decoders.values() if dec is None]
    if notes:
        out.append("\nnote: " + "; ".join(notes))
    if quick:
        out.append("--quick: one short round; ratios are indicative only.")
    print("\n".join(out))
    sys.stdout.flush()


def warn_mark(t):
    return (" ⚠" if t["failed"] or t["errors"] else "") + (" ~" if t["contaminated"] else "")


def err_cell(t):
    return ("%d" % t["errors"]) + (" (%d failed runs)" % t["failed"] if t["failed"] else "")


def nginx_temp_file_warnings(run_dir):
    """How often nginx logged that it buffered an upstream response to a temporary file."""
    try:
        return read_file(os.path.join(run_dir, "nginx-proxy-error.log")).count(
            "buffered to a temporary file")
    except OSError:
        return 0


# --------------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Compare fairway with nginx and HAProxy on this machine "
                    "(see benches/load/README.md).")
    ap.add_argument("--fairway", default="target/release/fairway",
                    help="fairway binary (default: target/release/fairway)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--interleave", choices=("scenario", "proxy"), default="scenario",
                    help="what a round interleaves: 'scenario' (default) runs each scenario "
                         "against every proxy in turn, all of them up at once; 'proxy' runs "
                         "one proxy at a time through every scenario")
    ap.add_argument("--duration", type=int, default=5,
                    help="seconds per scenario run (default 5)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round, 2 s per scenario")
    ap.add_argument("--only", default=",".join(ALL_PROXIES),
                    help="proxies to run, comma-separated (default nginx,haproxy,fairway)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="scenarios to run, comma-separated (default: all of %s); "
                         "'none' for none of them (with --compression or --big)"
                    % ",".join(SCENARIOS))
    ap.add_argument("--compression", action="store_true",
                    help="also compare response compression: a ~1 MiB JavaScript bundle "
                         "through nginx (gzip_comp_level 1 and 6) and fairway (level "
                         "fastest and default; gzip, br, zstd), and small answers with "
                         "compression on against off")
    ap.add_argument("--big", action="store_true",
                    help="also upload and download --big-size bytes through each proxy and "
                         "directly")
    ap.add_argument("--big-size", default="1GiB",
                    help="size of the --big transfers (default 1GiB; e.g. 256MiB)")
    ap.add_argument("--big-timeout", type=int, default=180,
                    help="seconds one big transfer may take (default 180)")
    ap.add_argument("--base-port", type=int, default=28000,
                    help="ports used: BASE+1..5, +10, +11, +20, +30, +31 (default 28000)")
    ap.add_argument("--out", default=None,
                    help="raw results JSON (default /tmp/fairway-load-<UTC time>.json)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the run directory (configs, logs) for debugging")
    ap.add_argument("--_sink", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.duration = 1, 2
    m = re.fullmatch(r"(\d+)\s*(|B|KiB|MiB|GiB|k|m|g)", a.big_size.strip(), re.I)
    if not m:
        ap.error("--big-size: want e.g. 1GiB, 256MiB or a byte count")
    a.big_size = int(m.group(1)) * {"": 1, "b": 1, "kib": 1 << 10, "k": 1 << 10,
                                    "mib": 1 << 20, "m": 1 << 20, "gib": 1 << 30,
                                    "g": 1 << 30}[m.group(2).lower()]
    a.proxies = [p.strip() for p in a.only.split(",") if p.strip()]
    bad = [p for p in a.proxies if p not in ALL_PROXIES]
    if bad or not a.proxies:
        ap.error("--only: unknown proxy %s; choose from %s" % (bad, ",".join(ALL_PROXIES)))
    a.scenario_list = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    if a.scenario_list == ["none"]:
        a.scenario_list = []
    bad = [s for s in a.scenario_list if s not in SCENARIOS]
    if bad:
        ap.error("--scenarios: unknown %s; choose from %s" % (bad, ",".join(SCENARIOS)))
    if not (a.scenario_list or a.big or a.compression):
        ap.error("--scenarios none: nothing to run without --compression or --big")
    if a.compression and not {"nginx", "fairway"} & set(a.proxies):
        ap.error("--compression compares nginx and fairway: --only has neither")
    if a.rounds < 1 or a.duration < 1:
        ap.error("--rounds and --duration must be >= 1")
    return a


class Interrupted(BaseException):
    pass


# --------------------------------------------------------------------------- setup
# Shared with profile.py: the same run directory, backend, proxies and cleanup.

def catch_signals():
    """SIGINT, SIGTERM and SIGHUP raise Interrupted, so that the caller's `finally` runs."""
    def on_signal(signum, frame):
        raise Interrupted(signum)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)


def ignore_signals():
    """From here on (cleanup), a second signal does not cut the cleanup short."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)


def raise_fd_limit():
    """1000+ connections need file descriptors: the soft limit goes up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
        except (ValueError, OSError):
            pass


def make_run_dir(big_size=None):
    """The run directory: nginx temp dirs, the 16 KiB file and (with big_size) the sparse
    big file. Returns (run_dir, the 16 KiB body).

    Files written while a proxy runs (h2load's request log, profile.py's perf and strace
    output) go to its `scratch` subdirectory: fairway watches the directory of its config,
    the run directory, and would wake up for every write there."""
    run_dir = tempfile.mkdtemp(prefix="fairway-load-")
    os.chmod(run_dir, 0o755)  # nginx workers may run as another user (root -> nobody)
    os.mkdir(os.path.join(run_dir, "scratch"))
    for name in ("backend", "nginx-proxy"):
        t = os.path.join(run_dir, "tmp-" + name)
        for sub in ("client", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(t, sub), exist_ok=True)
            os.chmod(os.path.join(t, sub), 0o777)
    pattern = bytes((48 + i % 75) for i in range(97))
    body16k = (pattern * (BODY_16K // len(pattern) + 1))[:BODY_16K]
    with open(os.path.join(run_dir, "16k.bin"), "wb") as f:
        f.write(body16k)
    if big_size:
        with open(os.path.join(run_dir, "big.bin"), "wb") as f:
            f.truncate(big_size)  # sparse: no disk used, reads as zeros
    for fn in ("16k.bin", "big.bin"):
        if os.path.exists(os.path.join(run_dir, fn)):
            os.chmod(os.path.join(run_dir, fn), 0o644)
    return run_dir, body16k


def check_ports_free(ports):
    busy = [p for p in ports if port_busy(p)]
    if busy:
        raise SetupError("port(s) already in use on %s: %s. Stop whatever holds them or "
                         "pick another range with --base-port." % (HOST, busy))


def start_backend(children, tools, run_dir, ports, body16k, big=False, sink=False,
                  buffered_upload=False, bundle=False):
    """One nginx as the three static upstreams (+ stub_status), and the upload sink when
    `sink`. Returns (backend process, backend config path)."""
    bconf = os.path.join(run_dir, "backend.conf")
    with open(bconf, "w") as f:
        f.write(backend_conf(run_dir, ports, big, buffered_upload, bundle))
    bargv = [tools["nginx"], "-p", run_dir + "/", "-e",
             os.path.join(run_dir, "backend-error.log"), "-c", bconf]
    r = subprocess.run(bargv + ["-t"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SetupError("backend nginx config rejected:\n" + r.stdout.decode())
    backend = children.start("backend", bargv, os.path.join(run_dir, "backend.log"))
    for p in ports.backends + [ports.stub]:
        if not wait_listening(p, backend):
            raise SetupError("backend nginx did not start (port %d):\n%s" % (
                p, log_tail(os.path.join(run_dir, "backend-error.log"))))
    if stub_status(ports.stub) is None:
        raise SetupError("backend stub_status on port %d does not answer" % ports.stub)
    if sink:
        sink_proc = children.start("sink", [sys.executable, os.path.abspath(__file__),
                                            "--_sink", str(ports.sink)],
                                   os.path.join(run_dir, "sink.log"))
        if not wait_listening(ports.sink, sink_proc):
            raise SetupError("upload sink did not start:\n" +
                             log_tail(os.path.join(run_dir, "sink.log")))
    preflight(ports.backends[0], body16k, "backend", spread=False)
    return backend, bconf


def after_run(px, name, scen):
    """Fails the session if the proxy exited during the run; else a pause before the next."""
    if px.proc.poll() is not None:
        raise SetupError("%s exited during %s:\n%s" % (name, scen, log_tail(px.proc.log_path)))
    time.sleep(0.3)


def start_proxy(children, px, run_dir, log_name, body16k, h2=False):
    """Starts a proxy fresh, waits for its port(s) and runs the preflight."""
    px.proc = children.start(px.name, px.argv, os.path.join(run_dir, log_name), env=px.env)
    if not wait_listening(px.port, px.proc):
        errlog = px.proc.log_path
        if px.name.startswith("nginx"):
            errlog = os.path.join(run_dir, "nginx-proxy-error.log")
        raise SetupError("%s did not start listening on %d:\n%s" % (
            px.name, px.port, log_tail(errlog)))
    preflight(px.port, body16k, px.name)
    if h2 and px.h2_port != px.port:
        if not wait_listening(px.h2_port, px.proc):
            raise SetupError("%s h2c port %d not listening" % (px.name, px.h2_port))


class Session:
    """What a run must clean up: its child processes, and its run directory once made."""

    def __init__(self):
        self.children = Children()
        self.run_dir = None


def run_session(args, run):
    """The frame of every run (this script's and profile.py's): signals caught, the fd limit
    raised, and whatever happens the children stopped and the run directory removed (kept
    with --keep). `run(session)` returns the exit status; a SetupError gives 2, an
    interruption 130."""
    catch_signals()
    raise_fd_limit()
    session = Session()
    try:
        return run(session)
    except SetupError as e:
        print("\nsetup failed: %s" % e, file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        print("\ninterrupted (%s); cleaning up" % e, file=sys.stderr)
        return 130
    finally:
        ignore_signals()
        session.children.stop_all()
        if session.run_dir:
            if args.keep:
                print("run directory kept: %s" % session.run_dir, file=sys.stderr)
            else:
                shutil.rmtree(session.run_dir, ignore_errors=True)


def main(argv):
    args = parse_args(argv)
    if args._sink is not None:
        sink_main(args._sink)
        return 0
    started = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    out_path = args.out or "/tmp/fairway-load-%s.json" % stamp

    def body(session):
        children = session.children
        status = 0
        shape = machine_shape()
        print("# fairway load comparison\n")
        print("machine: %d CPUs usable (%d online), %s, %s, %s RAM, loadavg %s" % (
            shape["nproc"], shape["cpus_online"], shape["cpu_model"], shape["kernel"],
            shape["memory"], " ".join(shape["loadavg"])))
        scenarios = list(args.scenario_list)
        tools, versions, notes = check_tools(args, args.proxies, scenarios)
        run_dir, body16k = make_run_dir(args.big_size if args.big else None)
        session.run_dir = run_dir
        bundle = bundle_info = decoders = None
        if args.compression:
            bundle, bundle_info = write_bundle(run_dir)
            decoders = find_decoders()
            print("bundle: %s bytes, %s; sha256 %s" % (
                fmt(bundle_info["bytes"], "rps"), bundle_info["what"],
                bundle_info["sha256"][:16]))
            print("decoding checked with: " + "; ".join(
                "%s: %s" % (c, how) for c, (_, how) in decoders.items()))
        fairway_bin = None
        if "fairway" in args.proxies:
            fairway_bin, fairway_src, fv = prepare_fairway(args.fairway, run_dir)
            versions["fairway"] = "%s (%s)" % (fv, fairway_src)
        print("tools: " + "; ".join("%s: %s" % kv for kv in versions.items()))
        for n in notes:
            print("note: " + n)
        ports = Ports(args.base_port)
        check_ports_free(ports.all(args.proxies, args.big))
        bg = background_busy()
        print("background CPU before start: %.0f%% of the machine" % bg)
        if bg > 10:
            print("warning: the machine is not quiet; numbers will be noisy")

        # Backend: one nginx, three static upstreams + stub_status.
        backend, bconf = start_backend(children, tools, run_dir, ports, body16k,
                                       big=args.big, sink=args.big, bundle=args.compression)

        # The main rounds: the scenarios (and --big) for each proxy of --only.
        main_rounds = args.rounds if scenarios or args.big else 0
        proxies = make_proxies(args.proxies, run_dir, ports, tools, fairway_bin,
                               "h2-c8x8" in scenarios) if main_rounds else {}
        comp_targets = make_comp_targets(args.proxies, run_dir, ports, tools, fairway_bin) \
            if args.compression else {}
        bench = Bench(args, tools, run_dir, ports, backend, body16k)
        order = list(args.proxies)
        if main_rounds:
            total_runs = args.rounds * len(order) * len(scenarios)
            print("scenarios: %s; proxies: %s; %d round(s) x %d s per run (%d runs)" % (
                ", ".join(scenarios) or "none", ", ".join(order), args.rounds, args.duration,
                total_runs))
        if comp_targets:
            comp_total = args.rounds * (
                sum(len(p.scenarios) for p in comp_targets.values())
                + sum(4 for _, on, off in SMALL_PAIRS if on in comp_targets))
            print("compression: %s; %d round(s) x %d s per run (%d runs)" % (
                ", ".join(comp_targets), args.rounds, args.duration, comp_total))
        print()
        runs, big_runs, idle = [], [], []
        if args.big:  # unrecorded: page cache and sink warmed before the first direct run
            for fn in (big_upload, big_download):
                try:
                    fn(ports.backends[0], min(args.big_size, 64 << 20), args.big_timeout)
                except OSError:
                    pass
        for rnd in range(1, main_rounds + 1):
            k = (rnd - 1) % len(order)
            rorder = order[k:] + order[:k]
            print("round %d/%d: %s" % (rnd, args.rounds, " ".join(rorder)))
            if args.big:
                for kind in BIG_SCENARIOS:
                    res = bench.measure_big(None, kind, rnd)
                    big_runs.append(res)
                    print("  direct   %-13s %s" % (kind, big_line(res)))
            # A slot: the proxies `names` started fresh and warmed up, then each scenario
            # run against each of them in turn, then all of them stopped. The ones not
            # being measured wait, idle.
            def slot(names):
                for name in names:
                    px = proxies[name]
                    start_proxy(children, px, run_dir, "%s-r%d.log" % (name, rnd), body16k,
                                h2="h2-c8x8" in scenarios)
                    idle.append({"round": rnd, "proxy": name, "rss_kib": rss_kib(px.pids()),
                                 "pids": len(px.pids())})
                    # Warm-up (not recorded): pools filled, caches and allocators warm.
                    run_wrk(tools, bench.lua, px.port, SCENARIOS["small-c64"], 1)
                for scen in scenarios:
                    for name in names:
                        px = proxies[name]
                        res = bench.measure(px, scen, rnd)
                        runs.append(res)
                        print("  %-8s %-12s %s" % (name, scen, run_line(res)))
                        sys.stdout.flush()
                        after_run(px, name, scen)
                if args.big:
                    for name in names:
                        for kind in BIG_SCENARIOS:
                            res = bench.measure_big(proxies[name], kind, rnd)
                            big_runs.append(res)
                            print("  %-8s %-12s %s" % (name, kind, big_line(res)))
                for name in names:
                    children.stop(proxies[name].proc)
                    proxies[name].proc = None

            if args.interleave == "scenario":
                slot(rorder)
            else:
                for name in rorder:
                    slot([name])
            print()

        comp_runs, comp_checks, reference, comp_summary = [], [], [], None
        if comp_targets:
            reference = codec_reference(bundle)
            comp_runs, comp_checks = run_compression(args, children, tools, run_dir, bench,
                                                     comp_targets, bundle, decoders, body16k)
            comp_summary = summarize_compression(comp_runs, comp_targets)

        table, ratios = summarize(runs, order, scenarios)
        print("machine: %d CPUs, %s, %s" % (shape["nproc"], shape["cpu_model"],
                                            shape["kernel"]))
        print("duration %d s per run, %d round(s), wrk -t1; medians over rounds\n"
              % (args.duration, args.rounds))
        if main_rounds:
            print_report(table, ratios, big_runs, order, args.quick)
        if comp_summary:
            if main_rounds:
                print()
            print_compression_report(comp_summary, bundle_info, reference, decoders,
                                     args.quick)
            spilled = nginx_temp_file_warnings(run_dir)
            if spilled:
                print("\nnote: nginx logged %d upstream response(s) buffered to a temporary "
                      "file (proxy_buffers full): that disk write is in its CPU." % spilled)
        runs_all = runs + comp_runs
        contaminated = [r for r in runs_all if r.get("contaminated")]
        if contaminated:
            print("\nwarning: %d run(s) saw > 15%% of a core used by other processes "
                  "(e.g. %s %s: %.1f CPU s); rerun on a quiet machine."
                  % (len(contaminated), contaminated[0]["proxy"], contaminated[0]["scenario"],
                     contaminated[0]["other_cpu_s"]))
        bad = [r for r in runs_all + big_runs if not r.get("ok") or r.get("error_count")]
        if bad:
            status = 1
        wall = time.time() - started
        result = {
            "started_utc": stamp, "wall_s": wall, "machine": shape, "tools": versions,
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "ports": vars(ports), "scenarios": {s: SCENARIOS[s] for s in scenarios},
            "configs": {"backend": read_file(bconf),
                        **{p.name: p.conf_text for p in proxies.values()}},
            "idle": idle, "runs": runs, "big": big_runs,
            "summary": {"table": table, "ratios": ratios}, "notes": notes,
        }
        if comp_targets:
            result["compression"] = {
                "bundle": bundle_info, "scenarios": COMP_SCENARIOS,
                "decoders": {c: how for c, (_, how) in decoders.items()},
                "codec_reference": reference, "checks": comp_checks, "runs": comp_runs,
                "summary": comp_summary,
                "nginx_temp_file_warnings": nginx_temp_file_warnings(run_dir),
                "configs": {p.name: p.conf_text for p in comp_targets.values()}}
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print("\nraw results: %s\nwall time: %.0f s (%dm%02ds)" % (
            out_path, wall, wall // 60, wall % 60))
        return status

    return run_session(args, body)


def run_line(r):
    if not r.get("ok"):
        return "FAILED: %s" % r.get("error")
    s = "%9s rps  p50 %s ms  p99 %s ms  cpu %s s/100k  rss %s MiB  up-conns %s" % (
        fmt(r.get("rps"), "rps"), fmt(r.get("p50_ms"), "ms"), fmt(r.get("p99_ms"), "ms"),
        fmt(r.get("proxy_cpu_per_100k"), "cpu"), fmt(r.get("rss_peak_kib"), "mib"),
        fmt(r.get("upstream_conns"), "int"))
    if r.get("error_count"):
        s += "  ERRORS %s" % {k: v for k, v in r["errors"].items() if v}
    if r.get("contaminated"):
        s += "  (other CPU %.1f s)" % r["other_cpu_s"]
    return s


def big_line(r):
    if not r.get("ok"):
        return "FAILED: %s" % r.get("error")
    s = "%8.0f MiB/s" % r["mib_per_s"]
    if "rss_growth_kib" in r:
        s += "  rss +%s MiB  cpu %.2f s/GiB" % (fmt(r["rss_growth_kib"], "mib"),
                                               r["proxy_cpu_per_gib"])
    return s


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
