"""The monitoring and load-test stack against real processes on loopback: a `bitskip serve`
process (tiny-test model, 4 layers, so the load test's exits 18 and 24 of 24 become 3 and 4), a
real Prometheus (Debian package `prometheus`) scraping it every second with the scrape job of
deploy/prometheus/prometheus.yml, and locust running loadtest/ headless for 15 s with 8 users.
Then every PromQL expression of the Grafana dashboard, and the Prometheus-adapter query behind
the HPA, is evaluated through Prometheus' HTTP API and must return data."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from models.config import preset
from models.random_checkpoint import write_random_checkpoint

from test_deploy_static import (PROMETHEUS_CONFIG, adapter_rule, dashboard_queries, load_dashboard,
                                variable_queries)
from conftest import require_system
from test_server_live import bitskip_serve, free_port, live_process

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent
LOCUST_SECONDS = 15
# exits 18 and 24 of a 24-layer model, on the 4-layer tiny-test model: round(4 * 18 / 24), 4
EXITS = ("3", "4")
# where the k8s scrape (ServiceMonitor or pod annotations) would put this server
K8S_LABELS = {"namespace": "bitskip-test", "pod": "bitskip-serve-0"}


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if path is None:
        require_system("prometheus", "apt-get install prometheus (.ci/run installs it)")
    return path


def scrape_config(target: str) -> dict:
    """deploy/prometheus/prometheus.yml with its bitskip job pointed at `target`, every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "bitskip")
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"] = [{"targets": [target], "labels": K8S_LABELS}]
    return config


@contextlib.contextmanager
def prometheus(tmp: Path, target: str):
    """A Prometheus process scraping `target`; yields its base URL once it is ready."""
    binary = prometheus_binary()
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(scrape_config(target)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with live_process(cmd, f"{url}/-/ready", tmp / "prometheus.log", "prometheus"):
        yield url


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.status_code} {body}"
    return body["data"]["result"]


def wait_for(what: str, check, seconds: float = 30.0):
    """Poll `check` until it returns something truthy, or fail naming `what`."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def grafana_to_promql(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana's interval macros and the dashboard variables with concrete values."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "5s").replace("$__range", "5m")
    for name, value in variables.items():
        expr = expr.replace("${%s}" % name, value).replace(f"${name}", value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def generate_200s(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "bitskip_requests"
               for s in f.samples if s.labels.get("endpoint") == "/generate" and s.labels.get("status") == "200")


def locust_stats(prefix: Path) -> dict[str, dict]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("deploy") / "tiny-test"
    write_random_checkpoint(path, preset("tiny-test"))  # what `bitskip init --preset tiny-test` writes
    return path


def test_locust_load_and_every_dashboard_query_against_prometheus(tiny_dir, tmp_path):
    with bitskip_serve(tiny_dir, tmp_path / "server.log") as (server_proc, port), \
            prometheus(tmp_path, f"127.0.0.1:{port}") as prom:
        url = f"http://127.0.0.1:{port}"
        wait_for("Prometheus to scrape the server",
                 lambda: [s for s in query(prom, 'up{job="bitskip"}') if s["value"][1] == "1"])

        # Locust, with one option from the command line and the others from the environment.
        prefix = tmp_path / "locust"
        env = {**os.environ, "LOCUST_CONFIDENCE_SHARE": "0.1", "LOCUST_SPECULATIVE_SHARE": "0.15",
               "LOCUST_PROMPT_LENGTHS": "short,medium,long",
               "LOCUST_EXIT_LAYERS": "18,24"}
        with open(tmp_path / "locust.log", "wb") as log:
            locust = subprocess.Popen(
                [sys.executable, "-m", "locust", "-f", "loadtest/", "--headless", "-u", "8", "-r", "8",
                 "-t", f"{LOCUST_SECONDS}s", "--stop-timeout", "10", "-H", url, "--csv", str(prefix),
                 "--only-summary", "--stream-share", "0.4"],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            try:
                # Once its traffic arrives, a few refused requests (not locust's) for the error and
                # rejection panels.
                wait_for("locust's first requests", lambda: generate_200s(url) > 0)
                for _ in range(3):
                    r = httpx.post(f"{url}/generate?exit_layer=99", json={"prompt": "x"}, timeout=30)
                    assert r.status_code == 422
                    assert httpx.post(f"{url}/generate", json={"prompt": "x" * 500}, timeout=30).status_code == 413
                rc = locust.wait(LOCUST_SECONDS + 60)
            finally:
                if locust.poll() is None:
                    locust.kill()
                    locust.wait()
        locust_log = (tmp_path / "locust.log").read_text()
        assert rc == 0, locust_log

        # Locust: zero failures, traffic at both exit layers, TTFT and inter-token entries of streams.
        stats = locust_stats(prefix)
        assert stats["Aggregated"]["Failure Count"] == "0", locust_log
        assert int(stats["Aggregated"]["Request Count"]) > 50, locust_log
        for k in EXITS:
            for name in (f"/generate exit={k}", f"/generate exit={k} stream", f"ttft exit={k}",
                         f"inter-token exit={k}"):
                count = int(stats.get(name, {}).get("Request Count", 0))
                assert count > 0, f"no {name!r} in locust's stats:\n{locust_log}"
        # the confidence policy is served (a server without it answers 422, counted as "not supported")
        assert int(stats.get("/generate policy=confidence", {}).get("Request Count", 0)) > 0, locust_log
        assert int(stats.get("/generate policy=speculative", {}).get("Request Count", 0)) > 0, locust_log
        assert not any("not supported" in n for n in stats), locust_log
        with open(f"{prefix}_failures.csv") as f:
            assert len(f.read().strip().splitlines()) <= 1, "locust recorded failures"

        # The server's own metrics: both exit layers (and the confidence policy's "dynamic").
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)}
        counts = {s.labels["exit_layer"]: s.value for s in fams["bitskip_request_latency_seconds"].samples
                  if s.name.endswith("_count")}
        assert all(counts.get(k, 0) > 5 for k in EXITS) and counts.get("dynamic", 0) > 0, counts
        tokens = {s.labels["exit_layer"]: s.value for s in fams["bitskip_generated_tokens"].samples}
        assert all(tokens.get(k, 0) > 0 for k in EXITS), tokens

        # Prometheus has scraped the traffic: the dashboard variable lists both exit layers.
        variables = {}
        for name, (metric, label) in variable_queries(load_dashboard()).items():
            def values():
                r = httpx.get(f"{prom}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10)
                got = r.json()["data"]
                return got if set(EXITS) <= set(got) else None
            got = wait_for(f"{label} values of {metric} in Prometheus", values)
            variables[name] = "|".join(sorted(got))

        # Every dashboard query returns data (a finite number somewhere); those split by exit layer
        # show both exit layers.
        for title, expr in dashboard_queries(load_dashboard()):
            promql = grafana_to_promql(expr, variables)
            result = query(prom, promql)
            assert result, f"panel {title!r}: no data for {promql}"
            assert any(math.isfinite(float(s["value"][1])) for s in result), \
                f"panel {title!r}: only NaN for {promql}: {result}"
            if re.search(r"by \([^)]*\bexit_layer\b", expr):  # not draft_exit_layer
                shown = {s["metric"].get("exit_layer") for s in result}
                assert set(EXITS) <= shown, f"panel {title!r}: exit layers {shown} for {promql}"

        # The HPA's metric, as the Prometheus adapter asks for it: series discovery, then the value per pod.
        rule = adapter_rule()
        r = httpx.get(f"{prom}/api/v1/series", params={"match[]": rule["seriesQuery"]}, timeout=10)
        assert r.json()["data"], f"the adapter's seriesQuery finds nothing: {rule['seriesQuery']}"
        matchers = f'namespace="{K8S_LABELS["namespace"]}",pod=~"{K8S_LABELS["pod"]}"'
        metrics_query = (rule["metricsQuery"].replace("<<.Series>>", "bitskip_requests_waiting")
                         .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod"))
        result = query(prom, metrics_query)
        assert [s["metric"] for s in result] == [{"pod": K8S_LABELS["pod"]}], result

        assert server_proc.poll() is None, "the server died under load"
