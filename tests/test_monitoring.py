"""The monitoring deploy files against real data: a real Prometheus server scrapes a
real `clickscore worker` (with `--rules deploy/rules.toml`) and a real `clickscore sink
webhook` while `clickscore replay` pushes a simulated log (plus a few malformed
messages, so dead-letter series exist) through the embedded broker; then every
dashboard panel query and every alerting-rule expression must return data from it.

Prometheus runs with deploy/prometheus.yml as shipped except for what a test must
change: the scrape interval (1 s), the rule file (deploy/alerts.yml by absolute path)
and each job's targets (this test's free ports; the job names, which the alerts use,
stay). `promtool check config/rules` on the deploy files is in test_deploy_files.py.

How an expression is made to return data (`data_queries`):
- dashboard: Grafana's variables are filled in (`GRAFANA_VARIABLES`; `$__rate_interval`
  -> 1m, a window that covers the whole run); an unknown `$variable` fails the test.
- alerts: an alert's expression returns data only while it fires, so each operand of a
  top-level `and` / `or` / `unless` is evaluated on its own, with a trailing comparison
  against a number (`> 1000`, `== 0`, ...) stripped, and `absent(X)` replaced by `X`
  (`absent(X)` is empty exactly when `X` has data). So `A > 0.01` checks `A`, and
  `A == 0 or absent(up{job="w"} == 1)` checks both `A` and `up{job="w"} == 1`.
A query passes when Prometheus answers with at least one sample whose value is a
number (a NaN, e.g. a quantile of a histogram with no observations, is what Grafana
draws as nothing). The test polls until every query passes, or fails naming the ones
that never did.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import REPO, free_port, fresh_topic

sys.path.insert(0, str(REPO))   # bench/ is not an installed package
from bench.stream import wait_for_ready  # noqa: E402
from bench.workerkit import CLICKSCORE, WorkerProcess, produce  # noqa: E402
from test_deploy_files import DEPLOY, dashboard_queries, tool  # noqa: E402
from test_sink import Webhook, start_sink  # noqa: E402

DEFAULT_MODEL = REPO / "onnx_models" / "default"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
_COMPARISON = re.compile(
    r"\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
MALFORMED = [  # (key, value): the worker dead-letters each with a reason of its own
    (b"m1", b'{"session_id": "m1", "event_type": '),                                  # invalid_json
    (b"m2", json.dumps({"session_id": "m2", "event_type": "wishlist", "item_id": "1",
                        "timestamp": 1767571253772}).encode()),                        # unknown_event_type
    (b"m3", json.dumps({"event_type": "view", "item_id": "1",
                        "timestamp": 1767571253772}).encode()),                        # missing_field
]


# -- turning the deploy files' expressions into queries that return data -------------

def split_top_level(expr: str) -> list[str]:
    """Operands of the set operators `and`, `or`, `unless` (with any `on(...)` /
    `ignoring(...)`) outside (), {}, [] and strings."""
    parts, depth, start, i, quote = [], 0, 0, 0, None
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_:")):
            match = re.match(r"(and|or|unless)\b(\s*(on|ignoring)\s*\([^)]*\))?", expr[i:])
            if match:
                parts.append(expr[start:i])
                start = i = i + match.end()
                continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def strip_threshold(expr: str) -> str:
    """`A > 0.5` -> `A`; `absent(X)` -> `X`; anything else unchanged."""
    expr = _COMPARISON.sub("", expr.strip())
    match = re.fullmatch(r"absent\s*\((.*)\)", expr, flags=re.S)
    return match.group(1).strip() if match else expr


def alert_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [(f"alert {rule['alert']}", strip_threshold(operand))
            for group in groups for rule in group["rules"]
            for operand in split_top_level(rule["expr"])]


def panel_queries() -> list[tuple[str, str]]:
    out = []
    for title, expr in dashboard_queries():
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"panel {title!r}: give GRAFANA_VARIABLES a value for {expr!r}"
        out.append((f"panel {title!r}", expr))
    return out


def test_query_rewriting():
    assert split_top_level('a > 1\nand\nsum by (t) (deriv(b[5m])) > 0') == \
        ["a > 1", "sum by (t) (deriv(b[5m])) > 0"]
    assert split_top_level('x == 0 or absent(up{job="and or"} == 1)') == \
        ["x == 0", 'absent(up{job="and or"} == 1)']
    assert split_top_level("sum(rate(sorted_total[1m])) / ignoring(x) order") == \
        ["sum(rate(sorted_total[1m])) / ignoring(x) order"]
    assert strip_threshold("a / clamp_min(b, 1e-9) > 0.01") == "a / clamp_min(b, 1e-9)"
    assert strip_threshold("histogram_quantile(0.99, x) >= 2.5e-1") == "histogram_quantile(0.99, x)"
    assert strip_threshold('absent(up{job="s"} == 1)') == 'up{job="s"} == 1'
    assert strip_threshold("max(x)") == "max(x)"
    # Every alert expression yields at least one query.
    rules = [rule for group in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
             for rule in group["rules"]]
    queries = alert_queries()
    assert {name for name, _ in queries} == {f"alert {rule['alert']}" for rule in rules}


# -- the real thing ------------------------------------------------------------------

def prometheus_config(path: Path, ports: dict[str, int]) -> Path:
    """deploy/prometheus.yml with 1 s scrapes, alerts.yml by absolute path and each job's
    targets replaced by this test's port for it (a job the test does not know fails)."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / name) for name in config["rule_files"]]
    for job in config["scrape_configs"]:
        assert job["job_name"] in ports, f"unknown job {job['job_name']} in deploy/prometheus.yml"
        labels = job["static_configs"][0].get("labels", {})
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"], "labels": labels}]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def api(base: str, endpoint: str, **params) -> dict:
    url = f"{base}/api/v1/{endpoint}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    except urllib.error.HTTPError as exc:
        if exc.code in (400, 422):   # a query Prometheus rejects: no point in waiting
            pytest.fail(f"Prometheus rejects {params}: {exc.read().decode()}")
        raise
    assert body["status"] == "success", body
    return body["data"]


def has_data(base: str, query: str) -> bool:
    data = api(base, "query", query=query)
    if data["resultType"] == "scalar":
        values = [float(data["result"][1])]
    else:
        values = [float(sample["value"][1]) for sample in data["result"]]
    return any(not math.isnan(v) for v in values)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_every_dashboard_and_alert_query_returns_data_from_a_real_run(broker, tmp_path):
    assert DEFAULT_MODEL.is_dir(), "onnx_models/default is the model the deploy files serve"
    run = uuid.uuid4().hex[:8]
    topics = {name: f"{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
    ports = {"clickscore-worker": free_port(), "clickscore-sink": free_port(), "prometheus": free_port()}
    base = f"http://127.0.0.1:{ports['prometheus']}"
    sim = tmp_path / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "300", "--seed", "21", "--buy-share", "0.2",
                    "--out", str(sim)], check=True, capture_output=True)
    n_events = pl.read_parquet(sim).height
    sessions = pl.read_parquet(sim)["session_id"].unique().sort().to_list()
    queries = panel_queries() + alert_queries() + [
        # ... and the run behind the data: every event consumed, bad input dead-lettered,
        # triggers fired and delivered, some after a retry.
        ("run", f"sum(clickscore_events_consumed_total) == {n_events + len(MALFORMED)}"),
        ("run", f"sum(clickscore_events_dead_lettered_total) == {len(MALFORMED)}"),
        ("run", "clickscore_triggers_fired_total > 0"),
        ("run", 'clickscore_sink_deliveries_total{outcome="delivered"} > 0'),
        ("run", "clickscore_sink_retries_total > 0"),
    ]
    # A third of the sessions' triggers fail once before they are accepted.
    webhook = Webhook(fail_first={s: 1 for s in sessions[::3]})
    worker = WorkerProcess(broker, DEFAULT_MODEL, topics, f"mon-{run}", tmp_path / "worker.log", free_port(),
                           ["--rules", str(DEPLOY / "rules.toml"),
                            "--metrics-port", str(ports["clickscore-worker"])])
    sink = prometheus = None
    try:
        with open(tmp_path / "prometheus.log", "wb") as log:
            prometheus = subprocess.Popen(
                [tool("prometheus"), f"--config.file={prometheus_config(tmp_path / 'prometheus.yml', ports)}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{ports['prometheus']}"],
                stdout=log, stderr=subprocess.STDOUT)
        worker.start()
        wait_for_ready(worker, timeout=90)
        sink = start_sink(broker, webhook.url, topics["triggers"], fresh_topic("triggers-dlq"),
                          fresh_topic("sink"), ports["clickscore-sink"],
                          "--initial-backoff-s", "0.1", "--max-backoff-s", "0.5")
        replay = subprocess.run(
            [CLICKSCORE, "replay", "--input", str(sim), "--topic", topics["input"], "--broker", broker,
             "--rate", "1500", "--progress", "false", "--json"], capture_output=True, text=True, timeout=120)
        assert replay.returncode == 0, replay.stderr
        assert json.loads(replay.stdout)["sent"] == n_events
        produce(broker, topics["input"], MALFORMED)

        missing = [f"{name}: {query}" for name, query in queries]
        deadline = time.monotonic() + 90
        while missing and time.monotonic() < deadline:
            time.sleep(1)
            try:
                missing = [f"{name}: {query}" for name, query in queries if not has_data(base, query)]
            except OSError:   # not up yet: the port opens before the query engine is ready
                continue
        assert worker.proc.poll() is None, worker.log()[-3000:]
        assert sink.poll() is None, sink.communicate()[0][-3000:]
        assert not missing, "no data for:\n" + "\n".join(missing) + \
            "\nprometheus log:\n" + (tmp_path / "prometheus.log").read_text()[-2000:]

        # Every target is up; every alerting rule is loaded and evaluates without error.
        targets = api(base, "targets")["activeTargets"]
        assert sorted(t["labels"]["job"] for t in targets) == sorted(ports)
        assert all(t["health"] == "up" for t in targets), [(t["scrapeUrl"], t["lastError"]) for t in targets]
        rules = [rule for group in api(base, "rules")["groups"] for rule in group["rules"]]
        alerts = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
        assert sorted(r["name"] for r in rules) == sorted(r["alert"] for g in alerts for r in g["rules"])
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    finally:
        stop(sink)
        worker.stop()
        stop(prometheus)
        webhook.close()
