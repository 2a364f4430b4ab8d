"""Every Kubernetes manifest in deploy/kubernetes validates with kubernetes-validate --strict (Kubernetes 1.31
schemas, offline); the pod templates inside the LeaderWorkerSet validate as PodTemplates; every container's
arguments parse with inflight-serve's own parser, and the ConfigMap's config file is read by its config loader."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from server.cli import build_parser
from server.config import BUNDLED_MODEL, merge_settings

kubernetes_validate = pytest.importorskip("kubernetes_validate")  # the test extra has it (not the GPU machine)
yaml = pytest.importorskip("yaml")

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((REPO_ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES = "1.31.0"
CUSTOM_KINDS = {"LeaderWorkerSet", "PodMonitor"}  # CRDs: no schema ships with Kubernetes


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "LeaderWorkerSet":
        template = doc["spec"]["leaderWorkerTemplate"]
        return [template["leaderTemplate"], template["workerTemplate"]]
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [doc["spec"]["template"]]
    return []


def test_there_are_manifests_of_every_kind_the_deployment_needs() -> None:
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "Secret", "LeaderWorkerSet",
            "PodMonitor"} <= kinds


@pytest.mark.parametrize(("name", "doc"), documents(), ids=lambda value: value if isinstance(value, str) else
                         f"{value['kind']}/{value['metadata']['name']}")
def test_each_manifest_validates_strictly(name: str, doc: dict[str, Any]) -> None:
    if doc["kind"] not in CUSTOM_KINDS:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    for template in pod_templates(doc):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                                      "template": template}, KUBERNETES, strict=True)


def test_a_misspelled_field_fails_strict_validation() -> None:  # the check above can fail
    (_, deployment), *_ = [(n, d) for n, d in documents() if d["kind"] == "Deployment"]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_container_arguments_and_the_config_file_are_what_inflight_serve_accepts() -> None:
    for _, doc in documents():
        for template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                build_parser().parse_args(container["args"])  # UsageError on an unknown or malformed option
        if doc["kind"] == "ConfigMap":
            with tempfile.TemporaryDirectory() as directory:
                path = Path(directory) / "config.yaml"
                path.write_text(doc["data"]["config.yaml"])
                settings = merge_settings({"model": str(BUNDLED_MODEL)}, {}, path)
            assert settings.device == "cuda" and settings.host == "0.0.0.0"


def test_the_pod_monitor_scrapes_the_port_the_deployment_names() -> None:
    monitors = [doc for _, doc in documents() if doc["kind"] == "PodMonitor"]
    deployment = next(doc for _, doc in documents() if doc["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for monitor in monitors:
        assert monitor["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"][
            "labels"].items()
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in {port["name"] for port in container["ports"]}
            assert endpoint["path"] == "/metrics"
