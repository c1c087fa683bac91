"""`make image-check [ZOO=1]`: build the CPU image (and the zoo image), run each as the manifests do, and
check what an operator relies on. Exit 1 when a check fails.

Each image runs as uid 10001 with a read-only root, every capability dropped and no new privileges, on
the host's loopback. Checked: the process's user; health SERVING only once every model of the repository
is ready (strict readiness) and the image's own HEALTHCHECK command; a KServe ModelInfer and a task call
(Classify) answered; /metrics scraped with every model ready; SIGTERM under load drains and exits 0; the
image's size. The CPU image serves a small repository built here (`nnserve-export zoo --fast --only fnn`)
and mounted read-only at /models; the zoo image serves the twelve models it holds.

Run with the project's venv (it calls through the SDK); ENGINE, IMAGE and VERSION as for deploy/image.sh.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nnserve_client import Client, NNServeError

ROOT = Path(__file__).resolve().parent.parent
SERVING = health_pb2.HealthCheckResponse.SERVING
SERVING_USER = "10001"  # the Dockerfile's USER and the manifests' runAsUser / runAsGroup


def engine() -> str:
    return os.environ.get("ENGINE") or ("podman" if shutil.which("podman") else "docker")


def tag(suffix: str) -> str:
    image = os.environ.get("IMAGE", "nnserve")
    name = f"{image}:{os.environ.get('VERSION', '0.1.0')}-{suffix}"
    return f"localhost/{name}" if engine() == "podman" and "/" not in image else name


def pinned_onnxruntime() -> str:
    (pin,) = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("onnxruntime==")]
    return pin.partition("==")[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str, check: bool = True, timeout: float = 60) -> str:
    """The engine's answer (stdout and stderr together: a container's log is both)."""
    command = [engine(), *args]
    done = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=_engine_env()
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{engine()} {' '.join(args[:2])} failed ({done.returncode}): {done.stdout.strip()[-500:]}")
    return done.stdout.strip()


def _engine_env() -> dict[str, str]:
    env = dict(os.environ)
    if engine() == "podman":
        env.setdefault("CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf"))
    return env


@dataclass
class Report:
    image: str
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failures.append(what)


def small_repository(where: Path) -> Path:
    """digits-fnn, trained in seconds (the quality bar is not the point here), readable by uid 10001."""
    repo = where / "models"
    subprocess.run(
        [sys.executable, "-m", "nnserve_exporters.cli", "zoo", "--fast", "--only", "fnn", "--out", str(repo)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    where.chmod(0o755)
    return repo


def wait_until_serving(target: str, start: float, within_s: float) -> tuple[float, list[str]]:
    """Poll health "" until SERVING: (seconds from `start` to SERVING, the models not ready then)."""
    while time.monotonic() - start < within_s:
        with grpc.insecure_channel(target) as channel:  # a fresh channel: a refused one waits out its backoff
            try:
                health = health_pb2_grpc.HealthStub(channel)
                if health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == SERVING:
                    break
            except grpc.RpcError:
                pass  # not listening yet
        time.sleep(0.1)
    else:
        raise TimeoutError(f"health did not say SERVING within {within_s:.0f} s")
    serving_at = time.monotonic() - start
    with Client(target) as client:
        unready = [m.name for m in client.models() if not client.model_ready(m.name)]
    return serving_at, unready


def answer_calls(report: Report, target: str) -> list[str]:
    with Client(target) as client:
        models = [m.name for m in client.models()]
        for name in models:
            spec = client.metadata(name).inputs[0]
            if spec.datatype != "FP32":
                continue
            shape = [1 if d < 0 else d for d in spec.shape]
            result = client.infer(name, {spec.name: np.zeros(shape, np.float32)})
            report.check(bool(result), f"KServe ModelInfer {name}: outputs {sorted(result)}")
            break
        else:
            report.check(False, "KServe ModelInfer: no model with an FP32 input to call")
        if "digits-fnn" in models:
            top = client.classify("digits-fnn", np.zeros((1, 64), np.float32), top_k=1)
            report.check(len(top) == 1, f"task Classify digits-fnn: label {top[0].label!r}")
        else:
            report.check(False, "task Classify: digits-fnn is not in the repository")
    return models


def drain_under_load(report: Report, name: str, target: str, model: str) -> None:
    """Calls keep coming while SIGTERM arrives: the server drains, stops, exits 0."""
    outcomes: dict[str, int] = {}
    stop = threading.Event()

    def load() -> None:
        with Client(target, retries=0) as client:
            deadline = time.monotonic() + 8  # bounded whatever happens
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    client.classify(model, np.zeros((8, 64), np.float32), timeout=2)
                    key = "OK"
                except NNServeError as error:
                    key = error.code
                    time.sleep(0.05)
                outcomes[key] = outcomes.get(key, 0) + 1

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(1.0)
    start = time.monotonic()
    run("kill", "--signal", "TERM", name)
    exit_code = run("wait", name, timeout=60)
    took = time.monotonic() - start
    stop.set()
    thread.join()
    logs = run("logs", name, check=False)
    report.check(exit_code == "0", f"SIGTERM under load: exit code {exit_code} after {took:.1f} s")
    report.check("stopped" in logs, "the log ends with 'stopped'")
    unexpected = {k: v for k, v in outcomes.items() if k not in ("OK", "UNAVAILABLE")}
    report.check(
        outcomes.get("OK", 0) > 0 and not unexpected,
        f"calls during the drain: {outcomes} (OK before the stop, UNAVAILABLE after it)",
    )


def check_image(image: str, repository: Path | None) -> Report:
    report = Report(image)
    name = f"nnserve-image-check-{os.getpid()}"
    grpc_port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    print(f"{image}:", flush=True)
    args = ["run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp"]
    args += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", f"{SERVING_USER}:{SERVING_USER}"]
    args += ["-e", "NNSERVE_HOST=127.0.0.1", "-e", f"NNSERVE_PORT={grpc_port}"]
    args += ["-e", "NNSERVE_METRICS_HOST=127.0.0.1", "-e", f"NNSERVE_METRICS_PORT={metrics_port}"]
    if repository is not None:
        args += ["-v", f"{repository}:/models:ro"]
    started = time.monotonic()
    run(*args, image)
    try:
        status = run("exec", name, "cat", "/proc/1/status").splitlines()
        uid = [line.split()[1] for line in status if line.startswith("Uid:")]
        report.check(uid == [SERVING_USER], f"the server runs as uid {uid[0] if uid else '?'}")
        serving_at, unready = wait_until_serving(target, started, within_s=180)
        report.check(not unready, f"health SERVING {serving_at:.1f} s after the start; not ready then: {unready}")
        probe = subprocess.run(
            [engine(), "exec", name, "nnserve", "health", "--target", target], capture_output=True, env=_engine_env()
        )
        report.check(probe.returncode == 0, "the image's HEALTHCHECK command (nnserve health) exits 0")
        healthcheck = run("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image)
        report.check('"nnserve","health"' in healthcheck.replace(" ", ""), f"HEALTHCHECK kept: {healthcheck}")
        models = answer_calls(report, target)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        ready = [m for m in text.splitlines() if m.startswith("nnserve_model_ready{") and m.endswith(" 1.0")]
        report.check(len(ready) == len(models), f"/metrics scraped: {len(ready)} of {len(models)} models ready")
        build = [line for line in text.splitlines() if line.startswith("nnserve_build_info{")]
        pinned = f'onnxruntime="{pinned_onnxruntime()}"'
        report.check(len(build) == 1 and pinned in build[0], f"onnxruntime as constraints.txt pins it: {build}")
        drain_under_load(report, name, target, "digits-fnn")
        size = int(run("image", "inspect", "--format", "{{.Size}}", image))
        print(f"  size {size / 1e6:.0f} MB, {len(models)} models: {', '.join(models)}", flush=True)
    except (RuntimeError, TimeoutError, NNServeError, grpc.RpcError, OSError) as error:
        report.check(False, f"{type(error).__name__}: {error}")
        print(run("logs", name, check=False)[-3000:], flush=True)
    finally:
        run("rm", "-f", name, check=False)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", action="store_true", help="also build and check the zoo image (trains: minutes)")
    parser.add_argument("--no-build", action="store_true", help="check the images as they are")
    options = parser.parse_args()
    targets = ["runtime", "runtime-zoo"] if options.zoo else ["runtime"]
    if not options.no_build:
        subprocess.run([str(ROOT / "deploy" / "image.sh"), *targets], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        reports = [check_image(tag("cpu"), small_repository(Path(tmp)))]
        if options.zoo:
            reports.append(check_image(tag("cpu-zoo"), None))
    failed = [f"{r.image}: {f}" for r in reports for f in r.failures]
    print("image check: " + ("passed" if not failed else "FAILED\n  " + "\n  ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
