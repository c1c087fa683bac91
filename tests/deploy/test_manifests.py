"""deploy/k8s: every overlay renders, validates offline, and agrees with the server it deploys."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import RunningServer
from crd_schemas import validate_custom
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nnserve_server.edge.app import FLUSH_S, SERVICE_NAMES
from nnserve_server.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(path.parent.name for path in (K8S / "overlays").glob("*/kustomization.yaml"))
INFERENCE_SERVICE = K8S / "kserve" / "inferenceservice.yaml"
# The oldest Kubernetes we promise (grpc probes and the preStop sleep action are on by default from 1.30)
# and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
PROBE_SERVICES = {"", *SERVICE_NAMES}
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"

Obj = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl")
    assert found, "kubectl is needed to render the Kustomize overlays (Debian package kubectl)"
    return found


@functools.cache
def rendered(overlay: str) -> tuple[Obj, ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return tuple(obj for obj in yaml.safe_load_all(out.stdout) if obj)


def all_objects() -> Iterator[tuple[str, Obj]]:
    for overlay in OVERLAYS:
        for obj in rendered(overlay):
            yield overlay, obj
    yield "kserve", yaml.safe_load(INFERENCE_SERVICE.read_text())


def one(objects: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def test_the_overlays_are_cpu_and_gpu() -> None:
    assert OVERLAYS == ["cpu", "gpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_the_whole_deployment(overlay: str) -> None:
    kinds = sorted(obj["kind"] for obj in rendered(overlay))
    expected = [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget",
        "Service", "Service", "ServiceMonitor",
    ] + (["PersistentVolumeClaim"] if overlay == "gpu" else [])  # fmt: skip
    assert kinds == sorted(expected)
    assert {obj["metadata"].get("namespace") for obj in rendered(overlay)} == {"nnserve"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly_offline(version: str) -> None:
    checked = []
    for source, obj in all_objects():
        name = f"{source}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            validate_custom(obj)  # ServiceMonitor, InferenceService: against their CRDs' fields
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} is invalid for Kubernetes {version}: {error.message}")
        checked.append(name)
    assert len(checked) == 18, checked  # 8 cpu, 9 gpu (with the PVC), 1 InferenceService


def test_the_validators_reject_a_misspelled_field() -> None:
    """The checks above can fail: a field out of place is caught in built-in and custom kinds."""
    deployment = json.loads(json.dumps(one(rendered("cpu"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolcy"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    monitor = json.loads(json.dumps(one(rendered("cpu"), "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        validate_custom(monitor)
    service = yaml.safe_load(INFERENCE_SERVICE.read_text())
    service["spec"]["predictor"]["containers"][0]["port"] = 8001
    with pytest.raises(jsonschema.ValidationError, match="port"):
        validate_custom(service)


def container_settings(container: Obj, config: dict[str, str]) -> Settings:
    """The settings the server will run with: the ConfigMap's variables, then the container's args."""
    environ = dict(config)
    for variable in container.get("env", []):
        if "value" in variable:
            environ[variable["name"]] = variable["value"]
    return Settings.load(container.get("args", []), environ=environ)


def check_pod(pod: Obj, container: Obj, settings: Settings, grpc_port_name: str) -> None:
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports[grpc_port_name] == settings.port
    assert settings.host == "0.0.0.0", "the server must listen on the pod's address, not loopback"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            probe = container[kind]["grpc"]
            assert probe["port"] == settings.port, kind
            assert probe["service"] in PROBE_SERVICES, f"{kind} asks for {probe['service']!r}, never registered"
    # The CPU limit reaches the server's thread sizing.
    (cpus,) = [v for v in container["env"] if v["name"] == ENV_PREFIX + "CPUS"]
    assert cpus["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert "cpu" in container["resources"]["limits"]
    # The kubelet waits for the whole drain; a draining pod is never restarted by its liveness probe.
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    drain = pre_stop + settings.grace_period_s + FLUSH_S
    assert pod["terminationGracePeriodSeconds"] > drain
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain
    # Non-root, read-only root, nothing to escalate to; the user is the image's.
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_user()
    assert pod["securityContext"]["runAsGroup"] == dockerfile_group()
    assert pod["automountServiceAccountToken"] is False
    mounts = {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}
    assert "/tmp" in mounts, "the read-only root needs a writable /tmp"
    assert dockerfile_env()["HOME"] in mounts, "HOME must be writable under the read-only root"
    if str(settings.model_repository) in mounts:
        assert mounts[str(settings.model_repository)].get("readOnly") is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifests_agree_with_the_server(overlay: str) -> None:
    objects = rendered(overlay)
    deployment = one(objects, "Deployment", "nnserve")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    config_map = one(objects, "ConfigMap")
    assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
    config = config_map["data"]
    known = {ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__}
    assert set(config) <= known, f"not server settings: {sorted(set(config) - known)}"
    settings = container_settings(container, config)
    check_pod(pod["spec"], container, settings, "grpc")
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["metrics"] == settings.metrics_port
    assert settings.model_repository == Path("/models") == Path(dockerfile_env()["NNSERVE_MODEL_REPOSITORY"])
    if overlay == "gpu":
        assert settings.providers == ("cuda", "cpu")
        assert not settings.allow_provider_fallback
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].endswith("-gpu")

    pod_labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    services = [o for o in objects if o["kind"] == "Service"]
    for service in services:
        assert selects(service["spec"]["selector"], pod_labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']} targets {port['targetPort']}"
    headless = one(objects, "Service", "nnserve-headless")
    assert headless["spec"]["clusterIP"] == "None"
    # The ServiceMonitor scrapes the metrics port of exactly one Service (no double counting).
    monitor = one(objects, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    scraped = [
        s
        for s in services
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        and endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}
    ]
    assert [s["metadata"]["name"] for s in scraped] == ["nnserve"]
    assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nnserve"}
    assert hpa["spec"]["minReplicas"] >= 2, "one replica cannot be drained without an outage"
    assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    policy = one(objects, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    allowed = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert allowed == {"grpc", "metrics"}


def test_the_inference_service_agrees_with_the_server() -> None:
    service = yaml.safe_load(INFERENCE_SERVICE.read_text())
    predictor = service["spec"]["predictor"]
    (container,) = predictor["containers"]
    settings = container_settings(container, dockerfile_env())  # no ConfigMap: the image's defaults
    check_pod(predictor, container, settings, "h2c")  # KServe sends gRPC to the port named h2c
    assert container["name"] == "kserve-container"


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    assert match, duration
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


@functools.cache
def dockerfile_lines() -> tuple[str, ...]:
    """deploy/Dockerfile with continuation lines joined."""
    text = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def dockerfile_stage(name: str) -> list[str]:
    lines, inside = [], False
    for line in dockerfile_lines():
        if line.startswith("FROM "):
            inside = line.endswith(f" AS {name}")
        elif inside:
            lines.append(line)
    assert lines, f"no stage {name}"
    return lines


def dockerfile_env(stage: str = "runtime") -> dict[str, str]:
    env: dict[str, str] = {}
    for line in dockerfile_stage(stage):
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def dockerfile_user(stage: str = "runtime") -> int:
    (user,) = [line.split()[1] for line in dockerfile_stage(stage) if line.startswith("USER ")]
    uid, _, _ = user.partition(":")
    return int(uid)  # numeric, so Kubernetes can check runAsNonRoot


def dockerfile_group(stage: str = "runtime") -> int:
    """USER's group, which must be the group the image creates for its user (useradd --user-group made 999)."""
    (user,) = [line.split()[1] for line in dockerfile_stage(stage) if line.startswith("USER ")]
    gid = int(user.partition(":")[2])
    installs = " ".join(line for line in dockerfile_stage(stage) if line.startswith("RUN "))
    assert f"groupadd --system --gid {gid} nnserve" in installs
    assert f"useradd --system --uid {dockerfile_user(stage)} --gid {gid} " in installs
    return gid


@pytest.mark.parametrize("stage", ["runtime", "runtime-gpu"])
def test_the_image_runs_the_server_as_configured(stage: str) -> None:
    env = dockerfile_env(stage)
    settings = Settings.load([], environ=env)  # every NNSERVE_* the image sets is a valid setting
    known = {ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__}
    assert {k for k in env if k.startswith(ENV_PREFIX)} <= known
    (expose,) = [line for line in dockerfile_stage(stage) if line.startswith("EXPOSE ")]
    assert expose.split()[1:] == [str(settings.port), str(settings.metrics_port)]
    assert dockerfile_user(stage) != 0
    assert dockerfile_group(stage) == dockerfile_user(stage)
    assert env["HOME"] == "/tmp"  # writable under a read-only root (onnxruntime keeps a telemetry id there)
    assert 'ENTRYPOINT ["nnserve", "serve"]' in dockerfile_stage(stage)
    assert any(line.startswith("HEALTHCHECK ") and '"nnserve", "health"' in line for line in dockerfile_stage(stage))
    installs = " ".join(line for line in dockerfile_stage(stage) if line.startswith("RUN "))
    assert "torch" not in installs, "the serving image has no torch"
    assert "exporters" not in installs
    if stage == "runtime-gpu":
        assert settings.providers == ("cuda", "cpu")
        assert "onnxruntime-gpu" in installs
    assert "--mount=type=bind" not in installs, "buildah 1.28 ships stale code from a cached bind-mounted stage"


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_the_gpu_image_takes_its_onnxruntime_from_the_constraints_and_the_docs_say_the_difference() -> None:
    """onnxruntime-gpu trails onnxruntime on PyPI: the one pin is constraints.txt, and deploy/README says it."""
    gpu = " ".join(dockerfile_stage("runtime-gpu"))
    assert "-c /tmp/constraints.txt onnxruntime-gpu " in gpu
    assert "onnxruntime-gpu==" not in gpu
    table = (ROOT / "deploy" / "README.md").read_text()
    assert f"`onnxruntime` {pins()['onnxruntime']}" in table
    assert f"`onnxruntime-gpu` {pins()['onnxruntime-gpu']}" in table


def test_make_image_builds_the_stages_the_dockerfile_has_with_what_keeps_the_healthcheck() -> None:
    stages = {line.split(" AS ")[1] for line in dockerfile_lines() if line.startswith("FROM ") and " AS " in line}
    script = (ROOT / "deploy" / "image.sh").read_text()
    targets = set(re.findall(r"^ +(\S+)\) build \1 ", script, re.M))
    assert targets == {"runtime", "runtime-zoo", "runtime-gpu"}
    assert targets <= stages
    assert "--format docker" in script, "podman's default OCI format drops HEALTHCHECK"
    makefile = (ROOT / "Makefile").read_text()
    assert "docker build" not in makefile
    assert "deploy/image.sh runtime runtime-zoo" in makefile
    assert 'RUN ["nnserve", "check"]' in dockerfile_stage("runtime-zoo"), "the zoo image loads every model as 10001"


def test_probes_and_health_command_against_a_real_server(own_server: Callable[..., RunningServer]) -> None:
    """The cpu overlay's settings start a real server whose health service answers every probe's name."""
    objects = rendered("cpu")
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {**one(objects, "ConfigMap")["data"], "NNSERVE_CPUS": "2"}
    # Loopback instead of the pod's address, a free port, and the test repository instead of /models.
    server = own_server("--host", "127.0.0.1", "--metrics-host", "127.0.0.1", env=env)
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            service = container[kind]["grpc"]["service"]
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, kind
    health_command = [str(Path(sys.executable).with_name("nnserve")), "health", "--target", server.target]
    ok = subprocess.run(health_command, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok
    assert "SERVING" in ok.stdout
    # A probe every few seconds imports none of the server: no onnxruntime (0.4-0.5 s a probe, and its
    # warnings on a read-only root), no numpy.
    probe = (
        "import sys; from nnserve_server.process.cli import main; main(sys.argv[1:]); "
        "print(sorted(set(sys.modules) & {'onnxruntime', 'numpy'}))"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe, "health", "--target", server.target], capture_output=True, text=True, timeout=30
    )
    assert imported.stdout.strip().endswith("[]"), imported
    unknown = subprocess.run([*health_command, "--service", "no-such-model"], capture_output=True, text=True)
    assert unknown.returncode == 1, unknown
    assert "NOT_FOUND" in unknown.stdout
    server.stop()
    gone = subprocess.run(health_command, capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1, gone
    assert "UNAVAILABLE" in gone.stdout


def test_checkov_finds_no_failed_check(tmp_path: Path) -> None:
    """Every overlay, the InferenceService and the Dockerfile; each suppression carries its reason."""
    assert CHECKOV.exists(), "checkov's venv is missing: run `make test` (it installs .venv-checkov)"
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(rendered(overlay)))
    shutil.copy(INFERENCE_SERVICE, tmp_path / "inferenceservice.yaml")
    shutil.copy(ROOT / "deploy" / "Dockerfile", tmp_path / "Dockerfile")
    out = subprocess.run(
        [str(CHECKOV), "-d", str(tmp_path), "--framework", "kubernetes", "dockerfile", "-o", "json", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert sorted(report["check_type"] for report in reports) == ["dockerfile", "kubernetes"], out.stderr[-2000:]
    for report in reports:
        failed = [(c["check_id"], c["resource"], c["check_name"]) for c in report["results"]["failed_checks"]]
        assert not failed, failed
        assert report["summary"]["passed"] > 50
        for skipped in report["results"]["skipped_checks"]:
            reason = skipped["check_result"].get("suppress_comment") or ""
            assert len(reason) > 20, f"{skipped['check_id']} is skipped without a reason"


def test_the_image_context_leaves_out_build_outputs() -> None:
    """A stale clients/build/ was copied into the image and setuptools reused it (issue 29, point 4)."""
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"**/build", "**/dist", "**/*.egg-info", "**/__pycache__"} <= set(ignored)
