"""The deployment files checked without a container engine (none runs on these machines):
docker-compose.yml (and the CPU override) against the Compose spec's JSON schema, the Kubernetes
manifests against Kubernetes' schemas, the Dockerfile through hadolint and by building the project
wheel from exactly what its COPY lines put in the image, the Prometheus config through promtool,
and the Grafana provisioning and dashboard against each other and against server/metrics.py.
The dashboard's queries are run against a real server and Prometheus in test_deploy_live.py."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

import yaml

from conftest import require_system

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy/grafana/dashboards/bitskip.json"
DATASOURCES = REPO / "deploy/grafana/provisioning/datasources/prometheus.yml"
DASHBOARD_PROVIDERS = REPO / "deploy/grafana/provisioning/dashboards/bitskip.yml"
PROMETHEUS_CONFIG = REPO / "deploy/prometheus/prometheus.yml"
K8S = REPO / "deploy/k8s"
DATASOURCE_UID = "bitskip-prometheus"
VENV_BIN = Path(sys.executable).parent


# ---- helpers shared with test_deploy_live ---------------------------------------------------

def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict) -> list[dict]:
    """Every panel, including those inside collapsed rows."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard_panels(dash) for t in p.get("targets", []) if "expr" in t]


def variable_queries(dash: dict) -> dict[str, tuple[str, str]]:
    """{variable name: (metric, label)} of the dashboard's label_values() variables."""
    out = {}
    for v in dash.get("templating", {}).get("list", []):
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)", q.strip())
        assert m, f"variable {v['name']}: only label_values(metric, label) queries are supported, got {q!r}"
        out[v["name"]] = (m[1], m[2])
    return out


def exported_metric_names() -> set[str]:
    """The series names server/metrics.py exposes (histograms as _bucket/_sum/_count, counters as _total)."""
    from server.metrics import Metrics
    names = set()
    for fam in Metrics(num_layers=4).registry.collect():
        if fam.type == "histogram":
            names |= {fam.name + s for s in ("_bucket", "_sum", "_count")}
        elif fam.type == "counter":
            names.add(fam.name + "_total")
        else:
            names.add(fam.name)
    return names


def compose_file(path: Path) -> dict:
    """A compose file, with Compose's `!reset` tag read as RESET."""
    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("!reset", lambda loader, node: RESET)
    return yaml.load(path.read_text(), Loader=Loader)


RESET = object()


def compose_merge(base: dict, override: dict) -> dict:
    """Compose's merge of an override file, for the mappings and scalars our override uses."""
    out = dict(base)
    for k, v in override.items():
        if v is RESET:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = compose_merge(out[k], v)
        else:
            out[k] = v
    return out


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, cwd=REPO,
                          stdin=subprocess.DEVNULL, **kw)


def tool(name: str) -> str:
    """A command installed into this venv by the dev extra (or found on PATH)."""
    path = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    assert path, f"{name} not found: install the dev extra (pip install -e '.[dev]')"
    return path


# ---- docker-compose.yml ----------------------------------------------------------------------

def check_compose_schema(*files: Path) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", *files)


def test_compose_files_match_the_compose_spec_schema(tmp_path):
    base = compose_file(REPO / "docker-compose.yml")
    cpu = compose_merge(base, compose_file(REPO / "docker-compose.cpu.yml"))
    (tmp_path / "cpu-merged.yml").write_text(yaml.safe_dump(cpu))
    r = check_compose_schema(REPO / "docker-compose.yml", tmp_path / "cpu-merged.yml")
    assert r.returncode == 0, r.stdout + r.stderr

    # the check can fail: an unknown service key is rejected
    broken = compose_merge(base, {"services": {"server": {"gpu": 1}}})
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    r = check_compose_schema(tmp_path / "broken.yml")
    assert r.returncode != 0 and "gpu" in r.stdout + r.stderr, r.stdout + r.stderr


def test_compose_services_gpu_reservation_and_cpu_fallback():
    base = compose_file(REPO / "docker-compose.yml")
    server = base["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert server["build"]["args"]["VARIANT"] == "gpu"
    assert server["command"][:2] == ["bitskip", "serve"] and "0.0.0.0" in server["command"]
    assert "8000:8000" in server["ports"]
    assert any(v.endswith(":/models:ro") for v in server["volumes"])
    assert "BITSKIP_MODEL" in server["environment"]

    cpu = compose_merge(base, compose_file(REPO / "docker-compose.cpu.yml"))["services"]["server"]
    assert "deploy" not in cpu, "the CPU override must drop the GPU reservation"
    assert cpu["build"]["args"]["VARIANT"] == "cpu"

    for name, svc in base["services"].items():
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag, got {image!r}"


def test_empty_bitskip_model_means_the_bundled_default(monkeypatch):
    # compose passes ${BITSKIP_MODEL:-}, i.e. an empty value, when no model is named
    from server.cli import build_parser
    monkeypatch.setenv("BITSKIP_MODEL", "")
    assert build_parser().parse_args(["serve"]).model is None
    monkeypatch.setenv("BITSKIP_MODEL", "/models/m")
    assert build_parser().parse_args(["serve"]).model == Path("/models/m")


def host_path(service: dict, container_path: str) -> Path | None:
    """The repo file a compose bind mount shows at `container_path` inside the service."""
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        inside = container_path == dst or container_path.startswith(dst.rstrip("/") + "/")
        if src.startswith((".", "/")) and inside:
            return (REPO / src / os.path.relpath(container_path, dst)).resolve()
    return None


def test_compose_mounts_prometheus_and_grafana_provisioning():
    services = compose_file(REPO / "docker-compose.yml")["services"]
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), f"{name} mounts {src}, which does not exist"

    prom = services["prometheus"]
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    assert host_path(prom, config_arg.split("=", 1)[1]) == PROMETHEUS_CONFIG.resolve()

    graf = services["grafana"]
    env = graf["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert host_path(graf, env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]) == DASHBOARD.resolve()
    assert host_path(graf, "/etc/grafana/provisioning/datasources/prometheus.yml") == DATASOURCES.resolve()
    assert host_path(graf, "/etc/grafana/provisioning/dashboards/bitskip.yml") == DASHBOARD_PROVIDERS.resolve()
    provider_dir = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]["options"]["path"]
    assert host_path(graf, provider_dir) == DASHBOARD.parent.resolve()


# ---- Prometheus and Grafana provisioning -----------------------------------------------------

def test_prometheus_config_passes_promtool_and_scrapes_the_server_every_5s():
    promtool = shutil.which("promtool")
    if promtool is None:
        require_system("promtool", "apt-get install prometheus (.ci/run installs it)")
    r = run(promtool, "check", "config", PROMETHEUS_CONFIG)
    assert r.returncode == 0, r.stdout + r.stderr
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "bitskip")
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    assert job["static_configs"][0]["targets"] == ["server:8000"]  # the compose service and its port


def test_grafana_datasource_has_the_fixed_uid_the_dashboard_uses():
    ds = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert [d["uid"] for d in ds] == [DATASOURCE_UID]
    assert ds[0]["type"] == "prometheus" and ds[0]["url"] == "http://prometheus:9090"


# ---- the dashboard ---------------------------------------------------------------------------

def test_dashboard_refers_to_the_provisioned_datasource_only():
    text = DASHBOARD.read_text()
    assert "${DS_" not in text and "__inputs" not in text
    dash = load_dashboard()
    panels = dashboard_panels(dash)
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, p["title"]
    for v in dash["templating"]["list"]:
        assert v["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, v["name"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"


def test_dashboard_metrics_exist_in_server_metrics():
    exported = exported_metric_names()
    dash = load_dashboard()
    used = {}
    for title, expr in dashboard_queries(dash):
        for name in re.findall(r"\bbitskip_\w+", expr):
            used.setdefault(name, title)
    for metric, _label in variable_queries(dash).values():
        used.setdefault(metric, "variable")
    unknown = {n: t for n, t in used.items() if n not in exported}
    assert not unknown, f"metrics not in server/metrics.py: {unknown}"


def test_dashboard_has_the_panels_the_issue_asks_for():
    dash = load_dashboard()
    exprs = [e for _, e in dashboard_queries(dash)]

    def some(pattern):
        return any(re.search(pattern, e) for e in exprs)
    for q in ("0.50", "0.95", "0.99"):
        assert some(rf"histogram_quantile\({q}, sum by \(le, exit_layer\) "
                    r"\(rate\(bitskip_request_latency_seconds_bucket")
    assert some(r"histogram_quantile\(.*by \(le, exit_layer\).*bitskip_time_to_first_token_seconds_bucket")
    assert some(r"histogram_quantile\(.*by \(le, exit_layer\).*bitskip_inter_token_latency_seconds_bucket")
    assert some(r"by \(exit_layer\) \(rate\(bitskip_generated_tokens_total")
    assert some(r"bitskip_token_exit_layer_bucket")
    assert some(r"bitskip_requests_running") and some(r"bitskip_requests_waiting")
    assert some(r"bitskip_kv_cache_usage_ratio")
    assert some(r'bitskip_requests_total\{status=~"5\.\.\|4\.\."\}') and some(r"bitskip_rejected_requests_total")
    # exit layers side by side: the latency panel repeats horizontally per exit_layer value
    repeated = [p for p in dashboard_panels(dash) if p.get("repeat")]
    assert any(p["repeat"] == "exit_layer" and p["repeatDirection"] == "h"
               and "bitskip_request_latency_seconds_bucket" in p["targets"][0]["expr"] for p in repeated)
    assert variable_queries(dash)["exit_layer"] == ("bitskip_request_latency_seconds_count", "exit_layer")
    assert dash["uid"] and dash["title"] == "BitSkip Serve"


# ---- the Dockerfile --------------------------------------------------------------------------

def dockerfile_instructions(path: Path = REPO / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = tool("hadolint")
    r = run(hadolint, "Dockerfile")
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\n")
    r = run(hadolint, bad)
    assert r.returncode != 0 and "DL3007" in r.stdout, r.stdout  # the linter does fail


def test_dockerfile_structure():
    ins = dockerfile_instructions()
    froms = [a for i, a in ins if i == "FROM"]
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    stages = {f.split()[-1] for f in froms if " AS " in f.upper()}
    for f in froms:
        image = f.split()[0]
        if "${" in image:  # a stage picked by a build argument
            assert image.replace("${VARIANT}", args["VARIANT"]) in stages, image
            continue
        assert ":" in image and not image.endswith(":latest"), f"pin the tag of {image}"
    assert froms[0].startswith("pytorch/pytorch:") and "cuda" in froms[0] and "runtime" in froms[0]
    assert args["VARIANT"] == "gpu" and "base-cpu" in stages and "base-gpu" in stages

    final = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM"):]
    user = [a for k, a in final if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    health = [a for k, a in final if k == "HEALTHCHECK"]
    assert len(health) == 1 and "/ready" in health[0]
    assert ("EXPOSE", "8000") in final
    assert ("CMD", '["bitskip", "serve", "--host", "0.0.0.0"]') in final
    assert any(k == "VOLUME" and "/models" in a for k, a in final)
    install = next(a for k, a in final if k == "RUN" and "pip install" in a)
    assert "--constraint" in install and "torch.__version__" in install, "torch must not be re-downloaded"


def dockerignore_patterns() -> list[tuple[bool, str]]:
    pats = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            neg = line.startswith("!")
            pats.append((neg, line.lstrip("!").strip("/")))
    return pats


def in_build_context(rel: str, patterns) -> bool:
    """.dockerignore's rule: the last pattern matching the path or one of its parent directories wins."""
    parts = PurePosixPath(rel).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for neg, pat in patterns:
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            included = neg
    return included


def test_image_gets_only_what_pip_needs_and_builds_the_project(tmp_path):
    """Emulates the build context and the COPY lines, then builds the wheel `pip install` would."""
    patterns = dockerignore_patterns()
    files = run("git", "ls-files", "--cached", "--others", "--exclude-standard").stdout.split()
    context = [f for f in files if in_build_context(f, patterns) and (REPO / f).is_file()]
    for outside in (".venv/bin/python", "data/x", "runs/x", "tests/test_deploy_static.py", ".git/HEAD",
                    "server/__pycache__/app.cpython-311.pyc"):
        assert not in_build_context(outside, patterns), outside
    assert "server/app.py" in context and "pyproject.toml" in context

    image = tmp_path / "image"
    copies = [a for k, a in dockerfile_instructions() if k == "COPY"]
    assert copies
    for c in copies:
        *srcs, dest = c.split()
        assert not any(s.startswith("--") for s in srcs), f"unsupported COPY form: {c}"
        for src in srcs:
            matched = [f for f in context if f == src or f.startswith(src.rstrip("/") + "/")]
            assert matched, f"COPY {src}: not in the build context (.dockerignore)"
            for f in matched:
                if f == src:  # a file: into the directory `dest/`, or as the file `dest`
                    target = image / dest.lstrip("/")
                    target = target / Path(f).name if dest.endswith("/") else target
                else:
                    target = image / dest.lstrip("/") / os.path.relpath(f, src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / f, target)
    src = image / "tmp/src"
    assert (src / "pyproject.toml").exists(), "the Dockerfile installs from /tmp/src"
    r = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
            "-q", "-w", tmp_path / "wheel", src)
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = next((tmp_path / "wheel").glob("bitskip_serve-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("server/app.py", "server/cli.py", "engine/llm_engine.py", "models/default_model.py"):
        assert f in names, f
    bundled = [f for f in context if f.startswith("models/default/")]
    assert set(bundled) <= names, "the bundled default model must be in the image's package"
    assert any(n.endswith("entry_points.txt") for n in names)


# ---- Kubernetes ------------------------------------------------------------------------------

def k8s_documents() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_k8s_manifests_match_the_kubernetes_schemas():
    import kubernetes_validate
    version = kubernetes_validate.latest_version()
    docs = k8s_documents()
    core = {k: d for k, d in docs.items() if not d["apiVersion"].startswith("monitoring.coreos.com/")}
    assert {k.split("/")[0] for k in core} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for name, doc in core.items():
        kubernetes_validate.validate(doc, version, strict=True)  # raises on a schema violation

    broken = json.loads(json.dumps(docs["Deployment/bitskip-serve"]))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_k8s_manifests_fit_together():
    docs = k8s_documents()
    deploy = docs["Deployment/bitskip-serve"]
    pod = deploy["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert any(e["name"] == "BITSKIP_MODEL" for e in c["env"])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims <= {k.split("/")[1] for k in docs if k.startswith("PersistentVolumeClaim/")}

    svc = docs["Service/bitskip-serve"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] in ports

    sm = docs["ServiceMonitor/bitskip-serve"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8000"

    hpa = docs["HorizontalPodAutoscaler/bitskip-serve"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "bitskip-serve"}
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "bitskip_requests_waiting"
    rule = adapter_rule()
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert "bitskip_requests_waiting" in exported_metric_names()


def adapter_rule() -> dict:
    """The prometheus-adapter rule serving bitskip_requests_waiting (shared with the live test)."""
    cm = k8s_documents()["ConfigMap/prometheus-adapter-bitskip"]
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    rule = next(r for r in rules if "bitskip_requests_waiting" in r["seriesQuery"])
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    placeholders = set(re.findall(r"<<\.\w+>>", rule["metricsQuery"]))
    assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= placeholders
    return rule


# ---- the locustfile --------------------------------------------------------------------------

def test_locustfile_rejects_bad_options_before_sending_anything():
    # no server at this address: the options are checked when locust starts, before any request
    r = run(sys.executable, "-m", "locust", "-f", "loadtest/", "--headless", "-u", "1", "-t", "1s",
            "-H", "http://127.0.0.1:9", "--confidence-share", "2", "--exit-layers", "30",
            env={**os.environ, "LOCUST_PROMPT_LENGTHS": "tiny"})
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "--confidence-share=2.0" in out and "--exit-layers=30" in out and "--prompt-lengths=tiny" in out, out


def test_loadtest_prompts_cover_three_lengths():
    lines = [x.strip() for x in (REPO / "loadtest/prompts.txt").read_text().splitlines()]
    prompts = [x for x in lines if x and not x.startswith("#")]
    assert len(prompts) >= 25 and len(set(prompts)) == len(prompts)
    words = [len(p.split()) for p in prompts]
    assert min(words) <= 8 and any(9 <= w <= 30 for w in words) and max(words) > 30
    assert all(p.isascii() for p in prompts)
