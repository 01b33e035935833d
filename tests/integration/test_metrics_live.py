"""/metrics of a live target, checked by Prometheus' own linter (promtool).

bdev I/O cannot reach a live target until the NVMe/TCP data path lands, so the per-I/O
values are covered by tests/unit/test_metrics.py; here the live exposition (every family
present, well-formed, lint-clean, counters moving) is what is checked.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .target_proc import Launcher, config, free_port, listen_address, malloc

NQN = "nqn.2026-01.io.test:metrics"


def scrape(t) -> str:
    status, headers, body = t.http_get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    return body.decode()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_live_scrape_passes_promtool(running_target: Launcher, promtool: str) -> None:
    port = free_port()
    t = running_target(config(
        [malloc("Malloc0", 256, 4096), {"method": "bdev_null_create",
                                        "params": {"name": "Null0", "num_blocks": 64}}],
        [{"method": "nvmf_create_subsystem", "params": {"nqn": NQN}},
         {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN,
                                                        "namespace": {"bdev_name": "Malloc0"}}},
         {"method": "nvmf_subsystem_add_listener",
          "params": {"nqn": NQN, "listen_address": listen_address(port)}}]))
    for _ in range(5):
        t.rpc("bdev_get_bdevs")
    t.http_rpc("spdk_get_version")
    try:
        t.rpc("bdev_get_bdevs", name="nope")
    except Exception:  # noqa: BLE001 - the error is the activity we want counted
        pass

    text = scrape(t)
    proc = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert proc.stdout.strip() == b"" and proc.stderr.strip() == b"", "no lint findings"

    fams = families(text)
    # the parser strips _total from counter family names
    for name, kind in [("blocktarget_bdev_read_bytes", "counter"),
                       ("blocktarget_bdev_written_bytes", "counter"),
                       ("blocktarget_bdev_ops", "counter"),
                       ("blocktarget_bdev_io_latency_seconds", "histogram"),
                       ("blocktarget_reactor_busy_seconds", "counter"),
                       ("blocktarget_reactor_idle_seconds", "counter"),
                       ("blocktarget_rpc_requests", "counter"),
                       ("blocktarget_subsystem_namespaces", "gauge")]:
        assert fams[name].type == kind, name
    assert "# TYPE blocktarget_bdev_read_bytes_total counter" in text
    assert 'blocktarget_bdev_read_bytes_total{bdev="Malloc0"} 0.0' in text
    assert 'blocktarget_bdev_size_bytes{bdev="Malloc0"} 1.048576e+06' in text
    assert 'blocktarget_bdev_claimed{bdev="Malloc0",module="malloc"} 1.0' in text
    hist = [(s.name, s.labels) for s in fams["blocktarget_bdev_io_latency_seconds"].samples
            if s.labels["bdev"] == "Null0" and s.labels["type"] == "read"]
    assert {n for n, _ in hist} == {f"blocktarget_bdev_io_latency_seconds{suffix}"
                                    for suffix in ("_bucket", "_sum", "_count")}
    assert len([1 for n, _ in hist if n.endswith("_bucket")]) == 16
    assert ('blocktarget_bdev_io_latency_seconds_bucket{bdev="Malloc0",le="+Inf",type="write"} 0.0'
            in text)
    assert f'blocktarget_subsystem_namespaces{{nqn="{NQN}"}} 1.0' in text
    assert 'blocktarget_reactor_busy_seconds_total{core="0",reactor="0"}' in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in fams.values() for s in f.samples}
    assert samples[("blocktarget_rpc_requests_total", ())] >= 7
    assert samples[("blocktarget_rpc_errors_total", ())] >= 1
    assert samples[("blocktarget_subsystems", ())] == 1
    assert [v for (n, labels), v in samples.items() if n == "blocktarget_info"] == [1.0]
    assert dict(next(labels for (n, labels) in samples if n == "blocktarget_info"))["pid"] == \
        str(t.pid)

    # counters only go up between scrapes; reactor wall time advances
    busy0 = samples[("blocktarget_reactor_busy_seconds_total", (("core", "0"), ("reactor", "0")))]
    idle0 = samples[("blocktarget_reactor_idle_seconds_total", (("core", "0"), ("reactor", "0")))]
    time.sleep(0.3)
    t.rpc("bdev_get_bdevs")
    s2 = {(s.name, tuple(sorted(s.labels.items()))): s.value
          for f in families(scrape(t)).values() for s in f.samples}
    key = (("core", "0"), ("reactor", "0"))
    assert s2[("blocktarget_reactor_busy_seconds_total", key)] >= busy0
    assert s2[("blocktarget_reactor_idle_seconds_total", key)] >= idle0 + 0.2
    assert s2[("blocktarget_rpc_requests_total", ())] > samples[("blocktarget_rpc_requests_total",
                                                                  ())]


def test_metrics_off(running_target: Launcher) -> None:
    t = running_target(config(metrics=False))
    status, _, _ = t.http_get("/metrics")
    assert status == 404
    assert t.http_rpc("spdk_get_version"), "RPC over HTTP still works"
