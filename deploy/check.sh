#!/usr/bin/env bash
# Validates the deployment files in deploy/ (run by CI after `cargo build`):
#
#   1. Kubernetes manifests (deploy/kubernetes/*.yaml)
#      a. schema: `kubeconform -strict -summary` when kubeconform is on PATH; otherwise the
#         PyPI package kubernetes-validate (the same upstream JSON schemas, bundled in the
#         package, so it needs no network at validation time), installed on first use into
#         target/deploy-check/venv. Neither kubeconform nor kubeval is packaged on PyPI, npm,
#         Debian or crates.io. If no schema validator can be had, this step is skipped with a
#         warning (DEPLOY_CHECK_REQUIRE_SCHEMA=1 makes that an error).
#      b. structure (always): every document has apiVersion/kind/metadata.name; workload
#         selectors match their pod labels; every container has an image and liveness and
#         readiness probes whose ports exist in the container; volume mounts name existing
#         volumes and no ConfigMap/Secret is mounted with subPath (it would never update);
#         Services and PodDisruptionBudgets select pods of this file and target existing
#         ports; and for each fairway container: its config comes from a ConfigMap of the
#         same file mounted as a directory, `fairway check` accepts that fairway.toml, the
#         listen/admin ports match the container ports, probes and Prometheus annotations use
#         the admin port, the security context is locked down,
#         terminationGracePeriodSeconds exceeds preStop sleep + server.shutdown_timeout, and
#         the memory limit holds server.max_connections at 64 KiB each plus 16 MiB.
#   2. Docker example (deploy/docker/compose.yaml and fairway.toml): `docker compose config`
#      (or `docker-compose config`) when installed, which needs no engine; `fairway check` on
#      the config; the Dockerfile bakes that config in; the compose file mounts its directory
#      at /etc/fairway, publishes the listen port, and the admin port on loopback only; the
#      admin token is set; every server is a compose service; stop_grace_period exceeds
#      server.shutdown_timeout.
#   3. systemd units (deploy/systemd/fairway.service and fairway.socket): `systemd-analyze
#      verify` on copies whose /usr/local/bin/fairway points at the built binary (the installed
#      path does not exist on a build machine, and verify rejects a unit whose binary is
#      missing), failing on any message, plus the `systemd-analyze security --offline` exposure
#      score. Skipped with a message when systemd-analyze is not installed. Always: every
#      ListenStream= of the socket unit is a listen address of config/fairway.toml (fairway
#      matches the sockets it is handed by address).
#
# Environment: FAIRWAY_BIN (default target/debug/fairway), KUBERNETES_VERSION (schema
# version, default 1.30.0), DEPLOY_CHECK_REQUIRE_SCHEMA=1, DEPLOY_CHECK_MAX_EXPOSURE (3.0),
# KUBECONFORM_FLAGS (extra kubeconform flags: kubeconform downloads its schemas from GitHub
# unless given `-schema-location` pointing at a local copy).
# Exit status: 0 when everything checked passed, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

FAIRWAY_BIN=${FAIRWAY_BIN:-target/debug/fairway}
KUBERNETES_VERSION=${KUBERNETES_VERSION:-1.30.0}
KUBERNETES_VALIDATE_VERSION=1.37.0
MAX_EXPOSURE=${DEPLOY_CHECK_MAX_EXPOSURE:-3.0}
VENV=target/deploy-check/venv
MANIFESTS=(deploy/kubernetes/*.yaml)
UNIT=deploy/systemd/fairway.service
SOCKET_UNIT=deploy/systemd/fairway.socket
EXAMPLE_CONFIG=config/fairway.toml
COMPOSE=deploy/docker/compose.yaml
DOCKER_CONFIG=deploy/docker/fairway.toml

failures=0
step() { printf '\n=== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; failures=$((failures + 1)); }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ ! -x $FAIRWAY_BIN ]]; then
    echo "FAIL: $FAIRWAY_BIN not found: run \`cargo build\` first, or set FAIRWAY_BIN" >&2
    exit 1
fi
FAIRWAY_BIN=$(cd "$(dirname "$FAIRWAY_BIN")" && pwd)/$(basename "$FAIRWAY_BIN")
echo "fairway binary: $FAIRWAY_BIN ($("$FAIRWAY_BIN" --version))"
echo "manifests: ${MANIFESTS[*]}"

# A Python with PyYAML for the structural check: the system's, else the venv's (which
# kubernetes-validate pulls PyYAML into), else PyYAML installed into the venv.
venv_python() {
    if [[ ! -x $VENV/bin/python ]]; then
        python3 -m venv "$VENV" >/dev/null 2>&1 || { rm -rf "$VENV"; return 1; }
    fi
    echo "$VENV/bin/python"
}

install_kubernetes_validate() {
    local py
    py=$(venv_python) || return 1
    if ! "$py" -c 'import kubernetes_validate' 2>/dev/null ||
        [[ $("$py" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null) != "$KUBERNETES_VALIDATE_VERSION" ]]; then
        echo "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION from PyPI into $VENV"
        "$py" -m pip install --quiet --disable-pip-version-check \
            "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" || return 1
    fi
    [[ -x $VENV/bin/kubernetes-validate ]]
}

# ---------------------------------------------------------------------------------------
step "Kubernetes manifests: schema (Kubernetes $KUBERNETES_VERSION, strict)"
if command -v kubeconform >/dev/null 2>&1; then
    echo "validator: kubeconform ($(command -v kubeconform))"
    # shellcheck disable=SC2086 # KUBECONFORM_FLAGS is a list of flags
    kubeconform -strict -summary -kubernetes-version "$KUBERNETES_VERSION" ${KUBECONFORM_FLAGS:-} "${MANIFESTS[@]}" ||
        fail "kubeconform rejected the manifests"
elif install_kubernetes_validate; then
    echo "validator: kubernetes-validate $KUBERNETES_VALIDATE_VERSION (kubeconform is not installed)"
    # Without --quiet it prints one line per document. Its exit status is not trusted alone:
    # it exits 0 after "WARN ... Couldn't find schema" (an unknown kind or apiVersion), so any
    # line that is not an "INFO ... passed for resource" line counts as a problem.
    if ! out=$("$VENV/bin/kubernetes-validate" --strict -k "$KUBERNETES_VERSION" "${MANIFESTS[@]}" 2>&1); then
        printf '%s\n' "$out"
        fail "kubernetes-validate rejected the manifests"
    else
        printf '%s\n' "$out"
        if grep -v -E '^INFO .* passed for resource ' <<<"$out" | grep -q .; then
            fail "kubernetes-validate reported problems"
        fi
    fi
else
    msg="no schema validator: kubeconform is not on PATH and kubernetes-validate could not be installed from PyPI"
    if [[ ${DEPLOY_CHECK_REQUIRE_SCHEMA:-0} == 1 ]]; then
        fail "$msg"
    else
        echo "SKIPPED: $msg (the structural check below still runs)"
    fi
fi

# ---------------------------------------------------------------------------------------
step "Kubernetes manifests: structure and fairway config"
if python3 -c 'import yaml' 2>/dev/null; then
    PY=python3
elif [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import yaml' 2>/dev/null; then
    PY=$VENV/bin/python
elif PY=$(venv_python) && "$PY" -m pip install --quiet --disable-pip-version-check pyyaml; then
    :
else
    echo "FAIL: PyYAML is missing and could not be installed (pip install pyyaml, or apt-get install python3-yaml)" >&2
    exit 1
fi
echo "python: $PY"

cat >"$tmp/structure.py" <<'PYTHON'
"""Structural checks of Kubernetes manifests that front or embed fairway."""
import os
import re
import shlex
import subprocess
import sys
import tempfile

import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11: the cross-checks that need the TOML values are skipped.
    tomllib = None

FAIRWAY_BIN = os.environ["FAIRWAY_BIN"]
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
    "CustomResourceDefinition", "PriorityClass", "IngressClass",
}

errors = []


def err(where, msg):
    errors.append(f"{where}: {msg}")
    print(f"  FAIL {where}: {msg}")


def ok(where, msg):
    print(f"  ok   {where}: {msg}")


def selector_matches(selector, labels):
    """A LabelSelector (matchLabels and matchExpressions) against a label map."""
    if not selector:
        return False
    labels = labels or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def parse_duration(s):
    """fairway's durations ("250ms", "30s", "1m", "1h 30m") in seconds, or None."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "secs": 1, "m": 60, "min": 60, "mins": 60,
             "h": 3600, "hr": 3600, "hrs": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", s.strip())
    if not parts or re.sub(r"[\d.\sa-z]", "", s.strip()):
        return None
    total = 0.0
    for n, u in parts:
        if u not in units:
            return None
        total += float(n) * units[u]
    return total


def parse_quantity(q):
    """A Kubernetes memory quantity ("320Mi", "1G", "268435456") in bytes, or None."""
    if q is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|K|M|G|T)?", str(q).strip())
    if not m:
        return None
    mult = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
            "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
    return int(float(m.group(1)) * mult)


def listen_port(addr):
    m = re.search(r":(\d+)$", addr.strip())
    return int(m.group(1)) if m else None


def is_loopback(addr):
    a = addr.strip()
    return a.startswith("127.") or a.startswith("[::1]") or a.startswith("localhost:")


def container_ports(c):
    by_name, numbers = {}, set()
    for p in c.get("ports") or []:
        n = p.get("containerPort")
        numbers.add(n)
        if p.get("name"):
            by_name[p["name"]] = n
    return by_name, numbers


def resolve_port(port, by_name, numbers):
    """The number a probe or Service port refers to in this container, or None."""
    if isinstance(port, int):
        return port if port in numbers else None
    if isinstance(port, str):
        if port.isdigit():
            return int(port) if int(port) in numbers else None
        return by_name.get(port)
    return None


def probe_target(probe):
    """(kind, port, path) of a probe's handler; port None for exec probes."""
    for kind in ("httpGet", "tcpSocket", "grpc"):
        if kind in probe:
            h = probe[kind] or {}
            return kind, h.get("port"), h.get("path")
    if "exec" in probe:
        return "exec", None, None
    return None, None, None


def prestop_sleep(c):
    """Seconds the container's preStop hook sleeps, when it is a plain sleep; else 0."""
    pre = ((c.get("lifecycle") or {}).get("preStop")) or {}
    if "sleep" in pre:
        return int((pre["sleep"] or {}).get("seconds") or 0)
    cmd = ((pre.get("exec") or {}).get("command")) or []
    if len(cmd) == 2 and os.path.basename(str(cmd[0])) == "sleep":
        try:
            return float(cmd[1])
        except ValueError:
            return 0
    if len(cmd) == 3 and cmd[1] == "-c":
        m = re.match(r"\s*sleep\s+(\d+)", str(cmd[2]))
        return float(m.group(1)) if m else 0
    return 0


def is_fairway(c):
    image = str(c.get("image") or "")
    repo = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    return repo == "fairway"


def config_path_of(c):
    args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
    for i, a in enumerate(args):
        if a in ("-c", "--config") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    for e in c.get("env") or []:
        if e.get("name") == "FAIRWAY_CONFIG" and e.get("value"):
            return e["value"]
    return "/etc/fairway/fairway.toml"  # FAIRWAY_CONFIG in the image


def check_fairway(where, c, pod, template_meta, volumes, configmaps, tmpdir):
    """The fairway-specific checks of one container; returns a short summary."""
    path = config_path_of(c)
    if not path.startswith("/"):
        err(where, f"config path {path!r} is not absolute")
        return
    cdir, cfile = os.path.dirname(path), os.path.basename(path)
    mount = None
    for m in c.get("volumeMounts") or []:
        mp = m.get("mountPath", "").rstrip("/")
        if mp == cdir or (cdir + "/").startswith(mp + "/") or mp == path:
            if mount is None or len(mp) > len(mount["mountPath"].rstrip("/")):
                mount = m
    if mount is None:
        err(where, f"no volume is mounted at {cdir}: fairway would run the image's example config")
        return
    if mount.get("subPath") or mount.get("subPathExpr"):
        err(where, f"the config mount at {mount['mountPath']} uses subPath: it never sees ConfigMap updates, so hot reload never happens; mount the directory")
    if mount.get("mountPath", "").rstrip("/") == path:
        err(where, f"the config file itself is the mount point: mount its directory {cdir} instead")
    vol = volumes.get(mount.get("name"))
    if not vol or "configMap" not in vol:
        err(where, f"the config volume {mount.get('name')!r} is not a configMap volume")
        return
    cm_name = vol["configMap"].get("name")
    cm = configmaps.get(cm_name)
    if cm is None:
        err(where, f"ConfigMap {cm_name!r} is not defined in this file")
        return
    rel = os.path.relpath(path, mount["mountPath"].rstrip("/") or "/")
    key = rel
    items = vol["configMap"].get("items")
    if items:
        key = next((i.get("key") for i in items if i.get("path") == rel), None)
    text = (cm.get("data") or {}).get(key) if key else None
    if text is None:
        err(where, f"ConfigMap {cm_name!r} has no key for {path} (looked for {key!r})")
        return

    # `fairway check` on the ConfigMap's file (syntax and semantics; it resolves no names).
    d = tempfile.mkdtemp(dir=tmpdir)
    cfg_file = os.path.join(d, cfile)
    with open(cfg_file, "w") as f:
        f.write(text)
    r = subprocess.run([FAIRWAY_BIN, "check", "-c", cfg_file], capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip().replace(cfg_file, f"ConfigMap {cm_name}/{key}")
    if r.returncode != 0:
        err(where, f"`fairway check` rejected ConfigMap {cm_name}/{key}:\n      {out}")
        return
    ok(where, f"fairway check: {out}")
    if tomllib is None:
        print(f"  note {where}: Python < 3.11 has no tomllib: port and timeout cross-checks skipped")
        return
    cfg = tomllib.loads(text)

    by_name, numbers = container_ports(c)
    listen = cfg["server"]["listen"]
    listen = [listen] if isinstance(listen, str) else listen
    for a in listen:
        if is_loopback(a):
            err(where, f"server.listen {a!r} is loopback: the Service cannot reach it; use 0.0.0.0")
        if listen_port(a) not in numbers:
            err(where, f"server.listen {a!r}: port not among the containerPorts {sorted(numbers)}")
    admin = (cfg.get("admin") or {}).get("listen")
    if not admin:
        err(where, "[admin] listen is not set: no /healthz, /readyz or /metrics for the probes")
        return
    admin_port = listen_port(admin)
    if is_loopback(admin):
        err(where, f"admin.listen {admin!r} is loopback: the kubelet's probes cannot reach it; use 0.0.0.0")
    if admin_port not in numbers:
        err(where, f"admin.listen {admin!r}: port not among the containerPorts {sorted(numbers)}")
    for probe_key, want in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        kind, port, ppath = probe_target(c.get(probe_key) or {})
        if kind != "httpGet" or ppath != want or resolve_port(port, by_name, numbers) != admin_port:
            err(where, f"{probe_key} should be httpGet {want} on the admin port {admin_port}")

    ann = (template_meta or {}).get("annotations") or {}
    if ann.get("prometheus.io/scrape") == "true":
        if str(ann.get("prometheus.io/port")) != str(admin_port):
            err(where, f"prometheus.io/port {ann.get('prometheus.io/port')!r} is not the admin port {admin_port}")
        if ann.get("prometheus.io/path", "/metrics") != "/metrics":
            err(where, "prometheus.io/path should be /metrics")

    psc = pod.get("securityContext") or {}
    csc = c.get("securityContext") or {}
    eff = lambda k: csc.get(k, psc.get(k))
    if eff("runAsNonRoot") is not True:
        err(where, "securityContext.runAsNonRoot should be true")
    uid = eff("runAsUser")
    if not isinstance(uid, int) or uid == 0:
        err(where, "securityContext.runAsUser should be a non-zero UID (the image's is 10001): the pod must stay non-root whatever image it is given, and the kubelet cannot verify runAsNonRoot for an image whose USER is a name")
    if csc.get("readOnlyRootFilesystem") is not True:
        err(where, "securityContext.readOnlyRootFilesystem should be true")
    if csc.get("allowPrivilegeEscalation") is not False:
        err(where, "securityContext.allowPrivilegeEscalation should be false")
    if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
        err(where, "securityContext.capabilities.drop should contain ALL")

    shutdown = parse_duration(str(cfg["server"].get("shutdown_timeout", "30s")))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    sleep = prestop_sleep(c)
    if shutdown is None:
        print(f"  note {where}: server.shutdown_timeout not understood here; grace period not checked")
    elif not grace > sleep + shutdown:
        err(where, f"terminationGracePeriodSeconds {grace} must exceed preStop sleep {sleep:g}s + shutdown_timeout {shutdown:g}s")
    else:
        ok(where, f"listen {', '.join(listen)}, admin {admin}; probes /healthz and /readyz on {admin_port}; "
                  f"grace {grace}s > preStop {sleep:g}s + shutdown_timeout {shutdown:g}s; security context locked down")

    # Memory: about 7 MiB idle and 30 KiB per busy client connection (about 36 MiB measured
    # with 1,000; 64 KiB each leaves room for large transfers and socket buffers), so the limit must hold server.max_connections of them, or the container is
    # OOM-killed long before fairway refuses a connection.
    max_conns = cfg["server"].get("max_connections", 10000)
    limit = parse_quantity(((c.get("resources") or {}).get("limits") or {}).get("memory"))
    need = (16 << 20) + max_conns * (64 << 10)
    if limit is None:
        print(f"  note {where}: no memory limit; memory use grows by about 64 KiB per connection up to server.max_connections ({max_conns})")
    elif limit < need:
        err(where, f"memory limit {limit >> 20} MiB is below 16 MiB + server.max_connections {max_conns} x 64 KiB = {need >> 20} MiB: raise the limit or lower max_connections")
    else:
        ok(where, f"memory limit {limit >> 20} MiB >= 16 MiB + server.max_connections {max_conns} x 64 KiB = {need >> 20} MiB")


def check_pod(where, pod, template_meta, configmaps, tmpdir):
    """Containers, probes, mounts of one pod spec; returns the pod's ports by name/number."""
    volumes = {}
    for v in pod.get("volumes") or []:
        if v.get("name") in volumes:
            err(where, f"volume {v.get('name')!r} is defined twice")
        volumes[v.get("name")] = v
    containers = pod.get("containers") or []
    if not containers:
        err(where, "no containers")
    all_ports = {}
    inits = [(c, True) for c in pod.get("initContainers") or []]
    for c, init in [(c, False) for c in containers] + inits:
        cw = f"{where} container {c.get('name')!r}"
        if not c.get("name"):
            err(cw, "has no name")
        if not c.get("image"):
            err(cw, "has no image")
        by_name, numbers = container_ports(c)
        for n, p in by_name.items():
            all_ports[n] = p
        for p in numbers:
            all_ports[p] = p
        long_running = not init or c.get("restartPolicy") == "Always"
        probes = ("livenessProbe", "readinessProbe") if long_running else ()
        for key in probes:
            if key not in c:
                err(cw, f"has no {key}")
        for key in ("startupProbe", "livenessProbe", "readinessProbe"):
            if key not in c:
                continue
            kind, port, _ = probe_target(c[key])
            if kind is None:
                err(cw, f"{key} has no handler")
            elif kind != "exec" and resolve_port(port, by_name, numbers) is None:
                err(cw, f"{key} port {port!r} is not one of this container's ports {sorted(by_name) + sorted(numbers)}")
        for m in c.get("volumeMounts") or []:
            v = volumes.get(m.get("name"))
            if v is None:
                err(cw, f"volumeMount {m.get('mountPath')!r} names volume {m.get('name')!r}, which the pod does not define")
                continue
            if (m.get("subPath") or m.get("subPathExpr")) and any(k in v for k in ("configMap", "secret", "projected")):
                err(cw, f"volumeMount {m.get('mountPath')!r} uses subPath on a {next(k for k in ('configMap', 'secret', 'projected') if k in v)} volume: it never receives updates")
        if is_fairway(c):
            check_fairway(cw, c, pod, template_meta, volumes, configmaps, tmpdir)
        if not any(e.startswith(cw) for e in errors):
            ok(cw, f"image {c.get('image')}, ports {sorted(numbers)}, "
                   f"probes {[k for k in ('startupProbe', 'livenessProbe', 'readinessProbe') if k in c]}, "
                   f"{len(c.get('volumeMounts') or [])} mount(s)")
    return all_ports


def check_file(path, tmpdir):
    print(f"{path}:")
    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError as e:
        err(path, f"not valid YAML: {e}")
        return
    if not docs:
        err(path, "no documents")
        return
    objs, seen, namespaces = [], set(), set()
    for i, d in enumerate(docs):
        where = f"{path} document {i + 1}"
        if not isinstance(d, dict):
            err(where, "is not a mapping")
            continue
        for k in ("apiVersion", "kind"):
            if not d.get(k):
                err(where, f"has no {k}")
        md = d.get("metadata") or {}
        if not md.get("name"):
            err(where, "has no metadata.name")
            continue
        ident = (d.get("kind"), md.get("namespace"), md["name"])
        if ident in seen:
            err(where, f"{d.get('kind')}/{md['name']} is defined twice")
        seen.add(ident)
        if d.get("kind") not in CLUSTER_SCOPED:
            namespaces.add(md.get("namespace"))
        objs.append(d)
    if len(namespaces) > 1:
        err(path, f"objects are spread over namespaces {sorted(map(str, namespaces))}: their references only resolve within one")
    configmaps = {o["metadata"]["name"]: o for o in objs if o.get("kind") == "ConfigMap"}

    pods = []  # (kind/name, template labels, pod ports, replicas)
    for o in objs:
        kind, name = o.get("kind"), o["metadata"]["name"]
        where = f"{kind}/{name}"
        if kind not in WORKLOADS:
            continue
        spec = o.get("spec") or {}
        tmpl = spec.get("template") or {}
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        sel = spec.get("selector")
        if not sel:
            err(where, "has no spec.selector")
        elif not selector_matches(sel, labels):
            err(where, f"spec.selector {sel} does not match the template labels {labels}")
        else:
            ok(where, f"selector matches the template labels {labels}")
        ports = check_pod(where, tmpl.get("spec") or {}, tmpl.get("metadata"), configmaps, tmpdir)
        pods.append((where, labels, ports, spec.get("replicas", 1)))

    for o in objs:
        kind, name = o.get("kind"), o["metadata"]["name"]
        where = f"{kind}/{name}"
        spec = o.get("spec") or {}
        if kind == "Service" and spec.get("selector"):
            matched = [p for p in pods if selector_matches({"matchLabels": spec["selector"]}, p[1])]
            if not matched:
                err(where, f"selector {spec['selector']} matches no pod template in this file")
                continue
            for sp in spec.get("ports") or []:
                target = sp.get("targetPort", sp.get("port"))
                for w, _, ports, _ in matched:
                    if target not in ports and not (isinstance(target, str) and target.isdigit() and int(target) in ports):
                        err(where, f"port {sp.get('name') or sp.get('port')}: targetPort {target!r} is not a container port of {w}")
            if not any(e.startswith(where) for e in errors):
                ok(where, f"selects {', '.join(p[0] for p in matched)}; target ports exist")
        if kind == "PodDisruptionBudget":
            matched = [p for p in pods if selector_matches(spec.get("selector"), p[1])]
            if not matched:
                err(where, "selector matches no pod template in this file")
                continue
            replicas = sum(p[3] for p in matched)
            mina = spec.get("minAvailable")
            if isinstance(mina, int) and mina >= replicas:
                err(where, f"minAvailable {mina} >= replicas {replicas}: no pod could ever be evicted (node drains would hang)")
            else:
                ok(where, f"selects {', '.join(p[0] for p in matched)} ({replicas} replicas), minAvailable {mina}")


def main():
    with tempfile.TemporaryDirectory() as tmpdir:
        for path in sys.argv[1:]:
            check_file(path, tmpdir)
    if errors:
        print(f"\n{len(errors)} problem(s) in the manifests")
        sys.exit(1)
    print("\nmanifests: no problems found")


main()
PYTHON
if ! FAIRWAY_BIN=$FAIRWAY_BIN "$PY" "$tmp/structure.py" "${MANIFESTS[@]}"; then
    fail "structural check of the manifests"
fi

# ---------------------------------------------------------------------------------------
step "Docker: $COMPOSE and $DOCKER_CONFIG"
# The compose file as Compose itself reads it (no engine needed): `docker compose config`,
# else the older `docker-compose config`; without either, the structural check below still
# parses it as YAML.
if docker compose version >/dev/null 2>&1; then
    echo "validator: $(docker compose version | head -n1)"
    docker compose -f "$COMPOSE" config --quiet || fail "docker compose config rejected $COMPOSE"
elif command -v docker-compose >/dev/null 2>&1; then
    echo "validator: $(docker-compose version --short 2>/dev/null || echo docker-compose)"
    docker-compose -f "$COMPOSE" config --quiet || fail "docker-compose config rejected $COMPOSE"
else
    echo "SKIPPED: Compose's own validation: neither \`docker compose\` nor docker-compose is installed"
fi
cat >"$tmp/compose.py" <<'PYTHON'
"""The compose example against the config it mounts and the image's Dockerfile."""
import os
import re
import subprocess
import sys

import yaml

try:
    import tomllib
except ImportError:
    tomllib = None

compose_path, config_path, fairway = sys.argv[1:4]
errors = []


def check(cond, ok_msg, err_msg):
    if cond:
        print(f"  ok   {ok_msg}")
    else:
        errors.append(err_msg)
        print(f"  FAIL {err_msg}")


r = subprocess.run([fairway, "check", "-c", config_path], capture_output=True, text=True)
check(r.returncode == 0, f"fairway check: {r.stdout.strip()}", f"fairway check rejected {config_path}: {(r.stdout + r.stderr).strip()}")
with open("Dockerfile") as f:
    dockerfile = f.read()
check(re.search(rf"^COPY {re.escape(config_path)} /etc/fairway/fairway.toml$", dockerfile, re.M),
      f"the image's built-in config is {config_path}",
      f"Dockerfile does not COPY {config_path} to /etc/fairway/fairway.toml")
with open(compose_path) as f:
    compose = yaml.safe_load(f)
services = compose.get("services") or {}
svc = services.get("fairway")
if svc is None or tomllib is None:
    check(svc is not None, "", f"{compose_path}: no service `fairway`")
    if tomllib is None:
        print("  note Python < 3.11 has no tomllib: cross-checks skipped")
    sys.exit(1 if errors else 0)
with open(config_path, "rb") as f:
    cfg = tomllib.load(f)

# The config directory is mounted (a single-file bind mount never sees a rename-over).
base = os.path.dirname(compose_path)
mounts = [v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in svc.get("volumes") or []]
dir_mount = any(
    m.split(":")[1].rstrip("/") == "/etc/fairway"
    and os.path.realpath(os.path.join(base, m.split(":")[0])) == os.path.realpath(os.path.dirname(config_path))
    for m in mounts if m.count(":") >= 1)
check(dir_mount, f"the directory of {config_path} is mounted at /etc/fairway",
      f"service fairway must mount the directory of {config_path} at /etc/fairway (not the file itself)")

published = {}
for p in svc.get("ports") or []:
    parts = str(p).split("/")[0].split(":")
    published[int(parts[-1])] = parts[0] if len(parts) == 3 else "0.0.0.0"
listen = cfg["server"]["listen"]
for a in [listen] if isinstance(listen, str) else listen:
    port = int(a.rsplit(":", 1)[1])
    check(not a.startswith("127.") and port in published, f"server.listen {a} is published",
          f"server.listen {a} must be on 0.0.0.0 and its port published")
admin = (cfg.get("admin") or {}).get("listen", "")
aport = int(admin.rsplit(":", 1)[1]) if admin else None
check(admin and not admin.startswith("127.") and published.get(aport) == "127.0.0.1",
      f"admin.listen {admin} is published on the host's loopback only",
      f"admin.listen ({admin or 'unset'}) must be on 0.0.0.0, published as 127.0.0.1:{aport}:{aport}")
check((cfg.get("admin") or {}).get("token"), "admin.token is set", "admin.token must be set: the admin port is reachable")

# Every server is a service of the file, and the drain outlasts the drain timeout.
for u, up in cfg["upstreams"].items():
    for srv in up["servers"]:
        addr = srv if isinstance(srv, str) else srv["addr"]
        host = addr.rsplit(":", 1)[0]
        check(host in services, f"upstreams.{u}: server {addr} is a service", f"upstreams.{u}: server {addr} is not a service of {compose_path}")


def seconds(d):
    total = 0.0
    for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", str(d)):
        total += float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u]
    return total


shutdown = seconds(cfg["server"].get("shutdown_timeout", "30s"))
grace = seconds(svc.get("stop_grace_period", "10s"))
check(grace > shutdown, f"stop_grace_period {grace:g}s > shutdown_timeout {shutdown:g}s",
      f"stop_grace_period ({grace:g}s) must exceed server.shutdown_timeout ({shutdown:g}s)")
sys.exit(1 if errors else 0)
PYTHON
"$PY" "$tmp/compose.py" "$COMPOSE" "$DOCKER_CONFIG" "$FAIRWAY_BIN" || fail "Docker example ($COMPOSE, $DOCKER_CONFIG)"

# ---------------------------------------------------------------------------------------
step "systemd units: $UNIT, $SOCKET_UNIT"
if command -v systemd-analyze >/dev/null 2>&1; then
    echo "validator: $(systemd-analyze --version | head -n1)"
    # A copy named fairway.service whose binary exists here. Every Exec line is kept, so a
    # typo in an option still shows; only the path of the binary changes.
    mkdir -p "$tmp/unit"
    sed "s#/usr/local/bin/fairway#$FAIRWAY_BIN#g" "$UNIT" >"$tmp/unit/fairway.service"
    # The socket unit beside it: verify checks that the service it activates exists.
    cp "$SOCKET_UNIT" "$tmp/unit/fairway.socket"
    # verify exits 0 on unknown keys and unparsable values (it only logs them), so any
    # output at all is a failure.
    out=$(systemd-analyze verify --man=no "$tmp/unit/fairway.socket" "$tmp/unit/fairway.service" 2>&1) && rc=0 || rc=$?
    if [[ $rc -ne 0 || -n $out ]]; then
        printf '%s\n' "${out//$tmp\/unit\//deploy/systemd/}"
        fail "systemd-analyze verify (exit $rc)"
    else
        echo "ok: systemd-analyze verify: no messages"
    fi
    # The sandbox as systemd scores it (0 = most locked down, 10 = unrestricted).
    if out=$(systemd-analyze security --offline=yes --no-pager "$tmp/unit/fairway.service" 2>&1); then
        level=$(sed -n 's/.*Overall exposure level for fairway.service: \([0-9.]*\).*/\1/p' <<<"$out")
        if [[ -z $level ]]; then
            echo "note: could not read the exposure level from systemd-analyze security"
        elif awk -v l="$level" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(l > m) }'; then
            printf '%s\n' "$out" | grep '✗' || true
            fail "systemd-analyze security: exposure $level is above $MAX_EXPOSURE"
        else
            echo "ok: systemd-analyze security: exposure $level (at most $MAX_EXPOSURE allowed)"
        fi
    else
        echo "note: systemd-analyze security --offline is not supported by this systemd: skipped"
    fi
    # fairway's own timing: TimeoutStopSec must outlast the drain of the example config.
    stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\{0,1\}$/\1/p' "$UNIT")
    if [[ -z $stop ]] || ((stop <= 30)); then
        fail "TimeoutStopSec (${stop:-unset}) must be above server.shutdown_timeout (30 s by default)"
    else
        echo "ok: TimeoutStopSec=$stop > default server.shutdown_timeout 30s"
    fi
else
    echo "SKIPPED: systemd-analyze is not installed (apt-get install systemd)"
fi
# The socket unit's addresses are the example config's: a socket that matches no address is
# closed by fairway, and the port would then be held by systemd and never served.
cat >"$tmp/socket.py" <<'PYTHON'
import re
import sys

try:
    import tomllib
except ImportError:
    print("note: Python < 3.11 has no tomllib: ListenStream= addresses not compared")
    sys.exit(0)

socket_path, config_path = sys.argv[1:3]
with open(config_path, "rb") as f:
    cfg = tomllib.load(f)
server = cfg.get("server") or {}
listen = server.get("listen") or []
addrs = set([listen] if isinstance(listen, str) else listen)
for extra in ((cfg.get("admin") or {}).get("listen"), server.get("redirect_http")):
    if extra:
        addrs.add(extra)
addrs = {"0.0.0.0" + a if a.startswith(":") else a for a in addrs}
with open(socket_path) as f:
    streams = re.findall(r"^ListenStream=(.*)$", f.read(), re.M)
bad = [s for s in streams if s.strip() not in addrs]
if not streams:
    print(f"FAIL: {socket_path} has no ListenStream=")
    sys.exit(1)
if bad:
    print(f"FAIL: {socket_path}: ListenStream= {bad} not among the addresses of {config_path} {sorted(addrs)}")
    sys.exit(1)
print(f"ok: ListenStream= {streams} are listen addresses of {config_path}")
PYTHON
"$PY" "$tmp/socket.py" "$SOCKET_UNIT" "$EXAMPLE_CONFIG" || fail "$SOCKET_UNIT against $EXAMPLE_CONFIG"

step "result"
if ((failures > 0)); then
    echo "$failures check(s) failed"
    exit 1
fi
echo "deploy/: all checks passed"
