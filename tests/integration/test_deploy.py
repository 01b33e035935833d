"""deploy/ checked with the tools that will consume it, against a real target.

Each artifact in deploy/ is a claim about the running target (its socket path, its
ports, its metric names, its readiness protocol) made in another tool's language, and
nothing in the package would notice if the two drifted apart. So the claims are checked
here the way those tools would check them: promtool for the rules (syntax and unit
tests), systemd-analyze for the unit, the real Prometheus server scraping a real target
and evaluating the rules and every dashboard query, and the manifests' own wiring (labels,
selectors, named ports, probe commands) exercised against a live process.

What cannot run here: `docker build` (no Docker daemon; the build test xfails with that
reason), a kubelet (the manifests are checked structurally and their commands, config
and probes are run outside Kubernetes), and systemd as PID 1 (the unit is verified and
scored, and the target's side of its contract, READY=1 and exit 0 on SIGTERM, is run).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .target_proc import Launcher, RunningTarget, free_port, listen_address, malloc
from .target_proc import config as make_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "blocktarget.json"
UNIT = DEPLOY / "blocktarget.service"
VENV_BIN = Path(sys.executable).parent
BLOCKTARGET = shutil.which("blocktarget", path=str(VENV_BIN)) or "blocktarget"
UNIT_EXEC = "/opt/blocktarget/bin/blocktarget"  # the install layout the unit assumes

# The families the issue asks the dashboard to show (counters without _total).
DASHBOARD_MUST_USE = {
    "blocktarget_bdev_ops_total", "blocktarget_bdev_errors_total",
    "blocktarget_bdev_read_bytes_total", "blocktarget_bdev_written_bytes_total",
    "blocktarget_bdev_io_latency_seconds_bucket", "blocktarget_reactor_busy_seconds_total",
    "blocktarget_reactor_idle_seconds_total", "blocktarget_reactor_connections",
    "blocktarget_subsystem_namespaces", "blocktarget_subsystem_connections",
    "blocktarget_rpc_requests_total", "blocktarget_rpc_errors_total", "blocktarget_info",
    "blocktarget_lvstore_free_clusters", "blocktarget_lvstore_out_of_space_errors_total",
}
METRIC_RE = re.compile(r"\bblocktarget_[a-z0-9_]+\b")


def need_tool(name: str, package: str) -> str:
    """The tool's path; missing fails in CI (it must be installed there) and skips locally."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing (install Debian package '{package}')")
        pytest.skip(f"{name} not installed (Debian package '{package}')")
    return path


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every manifest object by kind (each kind appears once in deploy/k8s)."""
    objs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_docs(path):
            assert doc["kind"] not in objs, f"{path.name}: second {doc['kind']}"
            objs[doc["kind"]] = doc
    return objs


def containers() -> dict[str, dict[str, Any]]:
    ds = k8s_objects()["DaemonSet"]
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


def configmap_template() -> str:
    cm = k8s_objects()["ConfigMap"]
    return cm["data"]["blocktarget.json"]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets(d: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t))
    return out


def rule_exprs() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"]
            for r in g["rules"]}


def localize(doc: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A deploy/ config made private to this test run: our RPC addresses, a free port."""
    doc = copy.deepcopy(doc)
    doc.get("blocktarget", {}).pop("rpc", None)  # RunningTarget fills in its own
    port = free_port()
    for sub in doc["subsystems"]:
        for call in sub["config"]:
            if call["method"] == "nvmf_subsystem_add_listener":
                call["params"]["listen_address"] = listen_address(port)
    return doc, port


def scrape_names(t: RunningTarget) -> set[str]:
    status, _, body = t.http_get("/metrics")
    assert status == 200
    return {line.split("{", 1)[0].split(" ", 1)[0]
            for line in body.decode().splitlines() if line and not line.startswith("#")}


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------- Prometheus rules

def test_rules_pass_promtool_check(promtool: str) -> None:
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in proc.stdout


def test_rules_unit_tests_pass(promtool: str) -> None:
    """Synthetic series prove each alert fires (and stays quiet) as its annotation says."""
    proc = subprocess.run([promtool, "test", "rules", "rules_test.yml"], capture_output=True,
                          text=True, timeout=60, cwd=RULES.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)",
                            (RULES.parent / "rules_test.yml").read_text()))
    assert tested == set(rule_exprs()), "every alert has a unit test"


def test_prometheusrule_carries_the_same_rules() -> None:
    pr = k8s_objects()["PrometheusRule"]
    assert pr["spec"] == yaml.safe_load(RULES.read_text())


def test_rules_cover_the_issue() -> None:
    exprs = rule_exprs()
    assert 'up{job="blocktarget"} == 0' in exprs.values(), "target down"
    assert any("blocktarget_bdev_errors_total" in e for e in exprs.values())
    assert any("histogram_quantile(0.99" in e and "_bucket" in e for e in exprs.values())
    assert any("blocktarget_rpc_errors_total" in e for e in exprs.values())


# ---------------------------------------------------------------- systemd

def unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; systemd allows repeated keys, configparser not."""
    section, out = "", []
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def unit_value(key: str) -> str:
    values = [v for s, k, v in unit_entries() if s == "Service" and k == key]
    assert len(values) == 1, (key, values)
    return values[0]


def installed_unit(tmp_path: Path) -> Path:
    """The unit as it would be installed, its ExecStart pointed at this venv's blocktarget
    (systemd-analyze checks that the binary exists; /opt/blocktarget is not installed here)."""
    text = UNIT.read_text()
    assert text.count(UNIT_EXEC) == 1
    path = tmp_path / "blocktarget.service"
    path.write_text(text.replace(UNIT_EXEC, BLOCKTARGET))
    return path


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = need_tool("systemd-analyze", "systemd")
    proc = subprocess.run([tool, "verify", "--man=no", str(installed_unit(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    # verify prints unknown keys and bad values as warnings, with exit status 0: any output
    # at all is a finding
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), \
        proc.stdout + proc.stderr


def test_unit_hardening_scores_ok(tmp_path: Path) -> None:
    """systemd's own exposure score (0 = locked down, 10 = unsafe) stays at 2.5 or less."""
    tool = need_tool("systemd-analyze", "systemd")
    proc = subprocess.run([tool, "security", "--offline=true", "--threshold=25",
                           str(installed_unit(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert score and float(score.group(1)) <= 2.5, proc.stdout[-500:]


def test_unit_contract() -> None:
    """The unit's promises that depend on how blocktarget behaves."""
    assert unit_value("Type") == "notify"  # app.py sends READY=1 after listeners are up
    assert not [k for _, k, _ in unit_entries() if k == "ExecReload"], \
        "blocktarget has no config reload: ExecReload would promise one"
    assert unit_value("RestartPreventExitStatus") == "2"  # bad config: see cli.py
    for key, want in [("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                      ("PrivateTmp", "yes"), ("NoNewPrivileges", "yes"),
                      ("CapabilityBoundingSet", ""),
                      ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX")]:
        assert unit_value(key) == want, key
    assert int(unit_value("LimitNOFILE")) >= 65536
    exec_start = unit_value("ExecStart").split()
    assert exec_start[:3] == [UNIT_EXEC, "start", "-c"]
    config_path = exec_start[3]
    assert config_path == f"/etc/{unit_value('ConfigurationDirectory')}/blocktarget.json"
    # the example config's RPC socket lives in the RuntimeDirectory systemd creates for
    # the service user (the default /var/tmp path would be hidden by PrivateTmp)
    example = json.loads((DEPLOY / "blocktarget.json").read_text())
    sock = example["blocktarget"]["rpc"]["unix"]
    assert Path(sock).parent == Path("/run") / unit_value("RuntimeDirectory")
    assert example["blocktarget"]["rpc"]["http"].startswith("127.0.0.1:")


def test_sysusers_creates_the_unit_user(tmp_path: Path) -> None:
    tool = need_tool("systemd-sysusers", "systemd")
    (tmp_path / "etc").mkdir()
    proc = subprocess.run([tool, f"--root={tmp_path}",
                           str(DEPLOY / "blocktarget.sysusers.conf")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    users = {line.split(":")[0]: line.split(":") for line in
             (tmp_path / "etc" / "passwd").read_text().splitlines()}
    user = unit_value("User")
    assert user in users and users[user][6] == "/usr/sbin/nologin"
    assert unit_value("Group") in (tmp_path / "etc" / "group").read_text()


def test_unit_example_config_under_the_notify_protocol(running_target: Launcher) -> None:
    """What systemd will see: READY=1 on NOTIFY_SOCKET, then exit 0 on KillSignal."""
    assert subprocess.run([BLOCKTARGET, "start", "--dry-run", "-c",
                           str(DEPLOY / "blocktarget.json")], capture_output=True,
                          timeout=60).returncode == 0
    doc, port = localize(json.loads((DEPLOY / "blocktarget.json").read_text()))
    t = running_target(doc)  # returns only after READY=1 arrived on NOTIFY_SOCKET
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    assert t.stop(getattr(signal, unit_value("KillSignal"))) == 0


# ---------------------------------------------------------------- Kubernetes

API_VERSIONS = {
    "Namespace": "v1", "ConfigMap": "v1", "Service": "v1", "DaemonSet": "apps/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}


def test_k8s_kinds_api_versions_and_namespace() -> None:
    objs = k8s_objects()
    assert set(objs) == set(API_VERSIONS)
    for kind, obj in objs.items():
        assert obj["apiVersion"] == API_VERSIONS[kind], kind
        if kind not in ("Namespace", "Kustomization"):
            assert obj["metadata"]["namespace"] == objs["Namespace"]["metadata"]["name"], kind
            assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "blocktarget"
    kust = objs["Kustomization"]
    assert sorted(kust["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_k8s_labels_selectors_and_ports_line_up() -> None:
    objs = k8s_objects()
    ds, svc, sm = objs["DaemonSet"], objs["Service"], objs["ServiceMonitor"]
    pod = ds["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    # the alert rules select job="blocktarget": the ServiceMonitor's job label must say so
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "blocktarget"

    spec = pod["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["nodeSelector"] == {"blocktarget.io/storage": "true"}
    pod_ports = {p["name"]: p["containerPort"] for c in spec["containers"]
                 for p in c.get("ports", [])}
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports and ep["path"] == "/metrics"
    for p in svc_ports.values():
        assert p["targetPort"] in pod_ports
        assert p["port"] == pod_ports[p["targetPort"]]  # hostNetwork: no port mapping

    tmpl = json.loads(re.sub(r"@[A-Z_]+@", "x", configmap_template()))
    listener_ports = {int(c["params"]["listen_address"]["trsvcid"])
                      for s in tmpl["subsystems"] for c in s["config"]
                      if c["method"] == "nvmf_subsystem_add_listener"}
    assert listener_ports == {pod_ports["nvme-tcp"]}

    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == objs["ConfigMap"]["metadata"]["name"]
    for c in spec["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, (c["name"], m["name"])
        res = c["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[kind]), (c["name"], kind)
        # Guaranteed QoS, so the static CPU manager can give reactors whole cores
        assert res["requests"] == res["limits"], c["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert "livenessProbe" in c and "readinessProbe" in c, c["name"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            http = c.get(probe, {}).get("httpGet")
            if http:  # a named port resolves among the probed container's own ports
                assert http["port"] in {p["name"] for p in c.get("ports", [])}, (c, probe)
                assert http["path"] in ("/metrics", "/healthz")
    assert spec["securityContext"]["runAsNonRoot"] is True
    uid = re.search(r"^ARG UID=(\d+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert uid and spec["securityContext"]["runAsUser"] == int(uid.group(1))


def render_configmap(tmp_path: Path) -> Path:
    """Run the DaemonSet's own start command, with its paths moved into tmp_path and
    `--dry-run` added; returns the rendered config."""
    c = containers()["blocktarget"]
    assert c["command"][:2] == ["/bin/sh", "-c"]
    script = c["command"][2]
    env_names = {e["name"] for e in c["env"]}
    for placeholder in set(re.findall(r"@([A-Z_]+)@", configmap_template())):
        assert f"s/@{placeholder}@/${{{placeholder}}}/g" in script, placeholder
        assert placeholder in env_names, placeholder
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    etc, run = tmp_path / "etc", tmp_path / "run"
    etc.mkdir()
    run.mkdir()
    (etc / "blocktarget.json").write_text(configmap_template())
    assert "exec blocktarget start -c " in script
    script = (script.replace(mounts["config"], str(etc)).replace(mounts["run"], str(run))
              .replace("exec blocktarget start", "exec blocktarget start --dry-run"))
    env = dict(os.environ, NODE_IP="127.0.0.1", NODE_NAME="node-1",
               PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    proc = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": OK (" in proc.stdout
    return run / "blocktarget.json"


def test_k8s_config_passes_dry_run(tmp_path: Path) -> None:
    rendered = json.loads(render_configmap(tmp_path).read_text())
    text = json.dumps(rendered)
    assert not re.search(r"@[A-Z_]+@", text), "every placeholder filled in"
    assert "nqn.2026-01.io.blocktarget:node-1:disk1" in text
    listeners = [c["params"]["listen_address"] for s in rendered["subsystems"]
                 for c in s["config"] if c["method"] == "nvmf_subsystem_add_listener"]
    assert listeners and all(a["traddr"] == "127.0.0.1" for a in listeners)
    rpc = rendered["blocktarget"]["rpc"]
    assert rpc["http"].startswith("127.0.0.1:"), "the unauthenticated RPC stays on loopback"


def test_k8s_probes_answer_on_a_live_target(tmp_path: Path, running_target: Launcher) -> None:
    """The DaemonSet's probes, run against the rendered ConfigMap config in a real target
    and the metrics relay started with the container's own arguments."""
    rendered = json.loads(render_configmap(tmp_path).read_text())
    sock, upstream = (rendered["blocktarget"]["rpc"][k] for k in ("unix", "http"))
    doc, _ = localize(rendered)
    t = running_target(doc)
    cs = containers()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        cmd = cs["blocktarget"][probe]["exec"]["command"]
        assert cmd[0] == "blocktarget" and sock in cmd, (probe, cmd)
        cmd = [BLOCKTARGET, *[t.sock_path if a == sock else a for a in cmd[1:]]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and "blocktarget" in proc.stdout, (probe, proc.stderr)

    relay = cs["metrics-proxy"]
    cmd = list(relay["command"])
    assert cmd[0] == "python" and cmd[1] == "/opt/blocktarget/share/metrics_proxy.py"
    assert "COPY deploy/metrics_proxy.py /opt/blocktarget/share/metrics_proxy.py" in \
        (DEPLOY / "Dockerfile").read_text()
    port = free_port()
    listen = cmd[cmd.index("--listen") + 1]
    assert listen == f"0.0.0.0:{relay['ports'][0]['containerPort']}"
    assert cmd[cmd.index("--upstream") + 1] == upstream
    cmd[cmd.index("--listen") + 1] = f"127.0.0.1:{port}"
    cmd[cmd.index("--upstream") + 1] = t.http_addr
    proc = subprocess.Popen([sys.executable, str(DEPLOY / "metrics_proxy.py"), *cmd[2:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "metrics relay did not start"
                time.sleep(0.05)
        for probe in ("livenessProbe", "readinessProbe"):
            path = relay[probe]["httpGet"]["path"]
            status, body = http_get(f"http://127.0.0.1:{port}{path}")
            assert status == 200, (probe, status, body[:200])
        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
        assert b"blocktarget_info{" in body
        # the point of the relay: JSON-RPC does not pass
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/", method="POST",
            data=b'{"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1}')
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 405
        assert http_get(f"http://127.0.0.1:{port}/rpc")[0] == 404
        # the relay reports a dead target as a failed readiness probe (502)
        t.stop()
        assert http_get(f"http://127.0.0.1:{port}/metrics")[0] == 502
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- Docker

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def dockerignore_includes(path: str) -> bool:
    """Docker's rule: the last matching pattern decides; `!` re-includes."""
    included = True
    for raw in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!")
        rx = re.escape(pat).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if re.fullmatch(rx, path) or any(re.fullmatch(rx, str(parent)) for parent in
                                         Path(path).parents if str(parent) != "."):
            included = negate
    return included


def test_dockerfile_references_and_settings() -> None:
    ins = dockerfile_instructions()
    stages = [rest.split()[-1] for op, rest in ins if op == "FROM"]
    assert stages == ["build", "base", "privileged", "runtime"]
    assert any(op == "ARG" and rest.startswith("PYTHON_IMAGE=python:3.11-slim")
               for op, rest in ins)
    for op, rest in ins:
        if op != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            probe = f"{src}/__init__.py" if (ROOT / src).is_dir() else src
            assert dockerignore_includes(probe), f"{src} is excluded from the build context"
    for leak in (".venv/bin/python", "blocktarget/_uring.abi3.so",
                 "blocktarget/__pycache__/app.cpython-311.pyc", "tests/unit/test_bdev.py"):
        assert not dockerignore_includes(leak), leak
    # the default (last) stage runs as the unprivileged user; the variant as root
    last_user = {}
    stage = None
    for op, rest in ins:
        if op == "FROM":
            stage = rest.split()[-1]
        elif op == "USER":
            last_user[stage] = rest
    assert last_user["runtime"] == "blocktarget:blocktarget"
    assert last_user["privileged"] == "root"
    expose = {p for op, rest in ins if op == "EXPOSE" for p in rest.split()}
    assert expose == {"4420", "9009"}
    health = [rest for op, rest in ins if op == "HEALTHCHECK"]
    assert len(health) == 1
    cmd = json.loads(health[0].split("CMD", 1)[1])
    image_config = json.loads((DEPLOY / "docker" / "blocktarget.json").read_text())
    assert cmd[:2] == ["blocktarget", "rpc"]
    assert cmd[cmd.index("-s") + 1] == image_config["blocktarget"]["rpc"]["unix"]
    http = image_config["blocktarget"]["rpc"]["http"]
    # 0.0.0.0 inside the container: reachable from the bridge, so guarded by a token
    assert http["address"] == "0.0.0.0:9009" and http["token_file"].startswith("/run/secrets/")
    default_cmd = json.loads([rest for op, rest in ins if op == "CMD"][-1])
    assert default_cmd == ["start", "-c", "/etc/blocktarget/blocktarget.json"]
    assert ("COPY", "deploy/docker/blocktarget.json /etc/blocktarget/blocktarget.json") in ins
    proc = subprocess.run([BLOCKTARGET, "start", "--dry-run", "-c",
                           str(DEPLOY / "docker" / "blocktarget.json")],
                          capture_output=True, text=True, timeout=60)
    if not os.path.exists(http["token_file"]):  # no secret mounted: refused, clearly
        assert proc.returncode == 2 and http["token_file"] in proc.stderr, proc.stderr
        with tempfile.TemporaryDirectory() as d:
            token = Path(d) / "token"
            token.write_text("0123456789abcdef0123456789abcdef\n")
            cfg = Path(d) / "blocktarget.json"
            image_config["blocktarget"]["rpc"]["http"]["token_file"] = str(token)
            cfg.write_text(json.dumps(image_config))
            proc = subprocess.run([BLOCKTARGET, "start", "--dry-run", "-c", str(cfg)],
                                  capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_docker_build(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    reachable = docker is not None and subprocess.run(
        [docker, "info"], capture_output=True, timeout=30).returncode == 0
    if not reachable:
        pytest.xfail("no Docker daemon here (no docker CLI, or it cannot reach a daemon): "
                     "the image build is not exercised; the Dockerfile's inputs are checked "
                     "by test_dockerfile_references_and_settings")
    if os.environ.get("BLOCKTARGET_DOCKER_BUILD") != "1":
        pytest.skip("set BLOCKTARGET_DOCKER_BUILD=1 to build the image (minutes, network)")
    for target in ("runtime", "privileged"):
        proc = subprocess.run([docker, "build", "-f", str(DEPLOY / "Dockerfile"), "--target",
                               target, "-t", f"blocktarget-test:{target}", str(ROOT)],
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([docker, "run", "--rm", "blocktarget-test:runtime", "version"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "blocktarget" in proc.stdout, proc.stderr


# ---------------------------------------------------------------- Grafana

def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "job", "instance", "bdev"} <= variables
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
    used = set(re.findall(r"\$\{?(\w+)", json.dumps(d)))
    assert used - {"__rate_interval", "__interval"} <= variables, "undefined variables"


def test_dashboard_covers_the_exported_families() -> None:
    exprs = " ".join(t["expr"] for _, t in dashboard_targets(dashboard()))
    assert DASHBOARD_MUST_USE <= set(METRIC_RE.findall(exprs))
    assert "histogram_quantile(0.99" in exprs


# ---------------------------------------------------------------- live target + Prometheus

NQN = "nqn.2026-01.io.test:deploy"
MALLOC_BLOCKS, MALLOC_BS = 4096, 4096


@pytest.fixture(scope="module")
def live(module_launcher: Launcher) -> Iterator[tuple[RunningTarget, int]]:
    port = free_port()
    t = module_launcher(make_config(
        [malloc("Malloc0", MALLOC_BLOCKS, MALLOC_BS), malloc("Pool0", 4096, 4096)],
        [{"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
         {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": True}},
         {"method": "nvmf_subsystem_add_ns",
          "params": {"nqn": NQN, "namespace": {"bdev_name": "Malloc0"}}},
         {"method": "nvmf_subsystem_add_listener",
          "params": {"nqn": NQN, "listen_address": listen_address(port)}}]))
    # a logical volume store, so its families have series (stores are made by RPC only)
    t.rpc("bdev_lvol_create_lvstore", bdev_name="Pool0", lvs_name="lvs0", cluster_sz=1 << 20)
    t.rpc("bdev_lvol_create", lvs_name="lvs0", lvol_name="vol0", size_in_mib=4,
          thin_provision=True)
    yield t, port


def test_every_metric_in_dashboard_and_rules_is_exported(live: tuple[RunningTarget, int]
                                                         ) -> None:
    t, _ = live
    names = scrape_names(t)
    used = {(f"panel {title!r}", n) for title, tg in dashboard_targets(dashboard())
            for n in METRIC_RE.findall(tg["expr"])}
    used |= {(f"variable {v['name']!r}", n) for v in dashboard()["templating"]["list"]
             if v["type"] == "query" for n in METRIC_RE.findall(v["definition"])}
    used |= {(f"alert {a}", n) for a, e in rule_exprs().items() for n in METRIC_RE.findall(e)}
    missing = sorted((where, n) for where, n in used if n not in names)
    assert not missing, f"not in a live scrape: {missing}"


class Prometheus:
    """A real Prometheus server on a free loopback port; always stopped and cleaned up."""

    def __init__(self, binary: str, scrape_addr: str, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        cfg = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "blocktarget",
                                "static_configs": [{"targets": [scrape_addr]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url)
        doc = json.loads(body)
        assert status == 200 and doc["status"] == "success", (path, params, doc)
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def wait(self, what: str, check: Any, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.logtext()}"
            try:
                value = check()
            except (OSError, ValueError):  # not listening yet
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"prometheus: {what} after {timeout}s"
            time.sleep(0.2)

    def logtext(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def grafana_to_promql(expr: str) -> str:
    """A panel query as Grafana sends it with "All" selected ($job is our scrape job)."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "1s")
            .replace("$job", "blocktarget").replace("$instance", ".*").replace("$bdev", ".*"))


def test_prometheus_scrapes_the_target_and_runs_rules_and_dashboard(
        live: tuple[RunningTarget, int]) -> None:
    binary = need_tool("prometheus", "prometheus")
    t, nvme_port = live
    workdir = Path(tempfile.mkdtemp(prefix="bt-prom-", dir="/tmp"))
    prom = Prometheus(binary, t.http_addr, workdir)
    try:
        prom.wait("ready", lambda: http_get(f"http://127.0.0.1:{prom.port}/-/ready")[0] == 200)
        # Prometheus' scrape manager applies new targets on a 5 s tick
        up = prom.wait("first scrape", lambda: prom.query('up{job="blocktarget"}'))
        assert [s["value"][1] for s in up] == ["1"]

        # real NVMe/TCP I/O while Prometheus scrapes, so rates and quantiles have data
        perf = subprocess.run(
            [BLOCKTARGET, "perf", "-a", "127.0.0.1", "-s", str(nvme_port), "-n", NQN,
             "-w", "randrw", "-o", "4096", "-q", "8", "-t", "2", "--quiet"],
            capture_output=True, text=True, timeout=60)
        assert perf.returncode == 0, perf.stdout + perf.stderr
        status, _, body = t.http_get("/metrics")
        ops = sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                  if line.startswith('blocktarget_bdev_ops_total{bdev="Malloc0"'))
        assert ops > 0

        # PromQL sees exactly what the target exports, once the next scrape lands
        def scraped_ops() -> bool:
            r = prom.query('sum(blocktarget_bdev_ops_total{job="blocktarget", bdev="Malloc0"})')
            return bool(r) and float(r[0]["value"][1]) == ops
        prom.wait("scrape after I/O", scraped_ops)
        size = prom.query('blocktarget_bdev_size_bytes{job="blocktarget", bdev="Malloc0"}')
        assert [float(s["value"][1]) for s in size] == [MALLOC_BLOCKS * MALLOC_BS]
        iops = prom.query('sum(rate(blocktarget_bdev_ops_total{job="blocktarget"}[1m]))')
        assert float(iops[0]["value"][1]) > 0
        p99 = prom.query('histogram_quantile(0.99, sum by (le) (rate('
                         'blocktarget_bdev_io_latency_seconds_bucket{job="blocktarget"}[1m])))')
        assert 0 < float(p99[0]["value"][1]) <= 1.0

        # the rules file is loaded, and every rule evaluates cleanly against real series
        def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = prom.api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if rules and all(r.get("lastEvaluation", "").startswith("0001") is False
                             and r.get("health") != "unknown" for r in rules):
                return rules
            return None
        rules = prom.wait("rule evaluation", rules_evaluated)
        assert {r["name"] for r in rules} == set(rule_exprs())
        for r in rules:
            assert r["health"] == "ok", (r["name"], r.get("lastError"))
            assert r["state"] == "inactive", (r["name"], r.get("alerts"))

        # every dashboard query is valid PromQL and finds series on a busy target
        empty = []
        for title, tg in dashboard_targets(dashboard()):
            if not prom.query(grafana_to_promql(tg["expr"])):
                empty.append((title, tg["refId"]))
        assert not empty, f"dashboard queries with no data: {empty}"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- prometheus log ---\n{prom.logtext()}") from None
    finally:
        prom.stop()
        shutil.rmtree(workdir, ignore_errors=True)
