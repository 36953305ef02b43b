"""deploy/: the Helm chart renders with real Helm and validates against the Kubernetes schemas
offline; its flags are ones `loraplex serve` accepts; the compose file validates against the
Compose spec; the Dockerfiles lint clean with hadolint and copy only files that exist."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "loraplex"
KUBERNETES_VERSION = "1.31.0"
BIN = Path(sys.executable).parent

FULL_VALUES = {  # every optional part switched on
    "auth": {"adminToken": "admin-secret", "apiKey": "key"},
    "adapters": {"sync": {"enabled": True, "env": [{"name": "RCLONE_CONFIG", "value": "/cfg"}]},
                 "persistence": {"storageClass": "fast"}},
    "model": {"path": "my-model", "existingClaim": "models", "servedModelName": "base"},
    "cache": {"existingClaim": "cache"},
    "admission": {"maxQueueWaitSeconds": 2, "adapterWeights": {"gold": 3}},
    "limits": {"maxPromptTokens": 4096},
    "extraArgs": ["--seed=7"],
    "serviceMonitor": {"enabled": True}, "autoscaling": {"enabled": True},
    "inferencePool": {"enabled": True, "endpointPicker": {"serviceName": "loraplex-epp"}},
}
INFERENCE_POOL_SCHEMA = Path(__file__).resolve().parent / "schemas" / "inferencepool-v1.json"


def render(values: dict | None = None, values_file: str | None = None) -> list[dict]:
    helm = pytest.importorskip("helm_python.chart")
    merged = yaml.safe_load((CHART / values_file).read_text()) if values_file else {}
    merged = _deep_merge(merged, values or {})
    manifests = helm.Chart.load(CHART).render(values=merged or None, name="prod")
    docs = []
    for path, text in manifests.items():
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


CASES = {"default": ({}, None), "gpu": ({}, "values-gpu.yaml"), "everything": (FULL_VALUES, None)}


@pytest.mark.parametrize("case", CASES)
def test_chart_renders_and_every_manifest_validates_offline(case):
    import kubernetes_validate

    values, values_file = CASES[case]
    docs = render(values, values_file)
    kinds = by_kind(docs)
    assert {"Deployment", "Service", "PodDisruptionBudget"} <= set(kinds)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # a CRD: no schema ships with Kubernetes; check the fields Prometheus Operator reads
            assert doc["spec"]["endpoints"][0]["path"] == "/metrics"
            assert doc["spec"]["selector"]["matchLabels"] == kinds["Service"]["spec"]["selector"]
            continue
        if doc["apiVersion"].startswith("inference.networking.k8s.io/"):
            check_inference_pool(doc, kinds)
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def check_inference_pool(pool: dict, kinds: dict) -> None:
    """Against the extension's own CRD schema (its release's openAPIV3Schema), plus its CEL rules,
    and pointing at this release's pods and HTTP port."""
    import jsonschema

    jsonschema.validate(pool, json.loads(INFERENCE_POOL_SCHEMA.read_text()))
    spec = pool["spec"]
    picker = spec["endpointPickerRef"]
    assert picker.get("kind", "Service") != "Service" or "port" in picker  # CEL: a Service needs a port
    numbers = [p["number"] for p in spec["targetPorts"]]
    assert len(numbers) == len(set(numbers))  # CEL: unique target ports
    pod = kinds["Deployment"]["spec"]["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    http = next(p for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "http")
    assert numbers == [http["containerPort"]]


def test_inference_pool_is_optional_and_needs_its_endpoint_picker():
    assert "InferencePool" not in by_kind(render())
    with pytest.raises(Exception, match="endpointPicker.serviceName is required"):
        render({"inferencePool": {"enabled": True}})
    pool = by_kind(render(FULL_VALUES))["InferencePool"]
    assert pool["spec"]["endpointPickerRef"] == {"name": "loraplex-epp", "port": {"number": 9002},
                                                 "failureMode": "FailClose"}


@pytest.mark.parametrize("case", CASES)
def test_rendered_flags_are_accepted_by_loraplex_serve(case):
    from loraplex.server.cli import build_parser

    values, values_file = CASES[case]
    container = by_kind(render(values, values_file))["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(["serve", *container["args"]])
    assert args.adapter_dir == Path("/adapters") and args.host == "0.0.0.0"


def test_probes_drain_and_grace_period_fit_together():
    docs = render(FULL_VALUES)
    kinds = by_kind(docs)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    main = pod["containers"][0]
    drain = next(float(a.split("=", 1)[1]) for a in main["args"] if a.startswith("--drain-timeout="))
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    assert pod["terminationGracePeriodSeconds"] > drain + float(re.search(r"sleep\((\d+)\)", pre_stop[-1]).group(1))
    assert main["startupProbe"]["httpGet"]["path"] == "/health"
    assert main["readinessProbe"]["grpc"]["port"] == next(p["containerPort"] for p in main["ports"]
                                                           if p["name"] == "grpc")
    assert main["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "--admin-token-file=/secrets/admin-token" in main["args"]
    assert kinds["Secret"]["stringData"]["admin-token"] == "admin-secret"
    assert [c["name"] for c in pod["containers"]] == ["loraplex", "adapter-sync"]
    service_ports = {p["name"]: p for p in kinds["Service"]["spec"]["ports"]}
    assert service_ports["grpc"]["appProtocol"] == "grpc" and service_ports["http"]["port"] == 8000
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    assert "--adapter-weight=gold=3" in main["args"]


def test_gpu_values_request_a_gpu_and_the_default_does_not():
    gpu = by_kind(render(values_file="values-gpu.yaml"))["Deployment"]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    cpu = by_kind(render())["Deployment"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(cpu["containers"][0]["resources"])


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_has_no_warnings_or_errors(case):
    helm = pytest.importorskip("helm_python.chart")
    values, values_file = CASES[case]
    merged = _deep_merge(yaml.safe_load((CHART / values_file).read_text()) if values_file else {}, values)
    report = helm.lint(CHART, merged or None, strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    assert report["total_charts_linted"] == 1
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report


def test_compose_file_validates_and_names_files_that_exist():
    compose = DEPLOY / "compose.yaml"
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    spec = yaml.safe_load(compose.read_text())
    assert {"loraplex", "prometheus", "grafana"} <= set(spec["services"])
    build = spec["services"]["loraplex"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for service in spec["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./") and not source.startswith(("./adapters", "./secrets")):
                assert (DEPLOY / source).exists(), source
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and scrape["static_configs"][0]["targets"] == ["loraplex:8000"]


DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean_and_copies_only_existing_files(dockerfile):
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = re.findall(r"^COPY\s+(.+)$", text, flags=re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _ = shlex.split(line)
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
            assert not any(source.rstrip("/") == pattern.rstrip("/") for pattern in ignored), source
    assert re.search(r"^USER\s+\d+", text, flags=re.MULTILINE), "must run as a numeric non-root user"
    assert "HEALTHCHECK" in text and "/health" in text
    assert re.search(r"^EXPOSE\s+8000\s+50051", text, flags=re.MULTILINE)
