"""deploy/: promtool accepts the Prometheus config and alert rules, the compose file is
valid YAML with the services it promises, every dashboard panel queries a clickscore_
metric, and a real Prometheus parses every dashboard query."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from conftest import REPO, free_port, wait_for_port
from stream import metrics

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "clickscore-dashboard.json"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not installed: `make system-deps` (Debian package prometheus)")
    return path


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel["targets"]]


def test_promtool_check_config():
    result = subprocess.run([tool("promtool"), "check", "config", str(DEPLOY / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_check_rules():
    result = subprocess.run([tool("promtool"), "check", "rules", str(DEPLOY / "alerts.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = [rule["alert"] for group in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
              for rule in group["rules"]]
    for wanted in ("ClickscoreConsumerLagGrowing", "ClickscoreDeadLetterRateHigh",
                   "ClickscoreNoEventsConsumed", "ClickscoreLatencyP99High"):
        assert wanted in alerts


def test_compose_file():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "worker-1", "worker-2", "sink", "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["sink"]["command"][:3] == ["clickscore", "sink", "webhook"]
    for name in ("worker-1", "worker-2"):
        assert services[name]["command"] == ["clickscore", "worker"]
        assert services[name]["environment"]["CLICKSCORE_BROKER"] == "kafka:19092"
    # Every file the compose file mounts from deploy/ exists.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    # Prometheus scrapes the compose services on the ports they expose.
    targets = [t for job in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
               for group in job["static_configs"] for t in group["targets"]]
    assert {"worker-1:9464", "worker-2:9464", "sink:9466",
            "127.0.0.1:9464", "127.0.0.1:9465", "127.0.0.1:9466"} <= set(targets)


def test_every_panel_queries_a_clickscore_metric():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len(panels) >= 7
    known = {m.name for registry in (metrics.REGISTRY, metrics.SINK_REGISTRY)
             for m in registry.collect() if m.name.startswith("clickscore_")}
    for panel in panels:
        exprs = [t.get("expr", "") for t in panel.get("targets", [])]
        names = {n for e in exprs for n in re.findall(r"\bclickscore_[a-z0-9_]+", e)}
        assert names, f"panel {panel['title']!r} queries no clickscore_ metric"
        # ... and only metrics that stream/metrics.py defines (with their suffixes).
        for name in names:
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert base in known, f"panel {panel['title']!r}: unknown metric {name}"
    titles = " ".join(p["title"].lower() for p in panels)
    for wanted in ("throughput", "latency", "lag", "buy-probability", "triggers", "dead letters",
                   "execution provider"):
        assert wanted in titles


def test_real_prometheus_parses_dashboard_queries(tmp_path):
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
    proc = subprocess.Popen(
        [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:   # the port opens before the query engine is ready
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for title, expr in dashboard_queries():
            # Grafana fills in $__rate_interval; Prometheus must parse the rest.
            query = expr.replace("$__rate_interval", "1m")
            url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
            try:
                body = json.loads(urllib.request.urlopen(url, timeout=10).read())
            except urllib.error.HTTPError as exc:
                pytest.fail(f"panel {title!r}: Prometheus rejects {query!r}: {exc.read().decode()}")
            assert body["status"] == "success", (title, body)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
