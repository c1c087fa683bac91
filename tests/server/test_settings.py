"""The settings object: defaults < NNSERVE_* environment < flags, validated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from nnserve_server.core.errors import StartupError
from nnserve_server.core.runtime import Runtime, cpu_quota
from nnserve_server.settings import Settings

pytestmark = pytest.mark.fast  # in process: no torch, no subprocess, no extra venv (make test-fast)


def test_defaults() -> None:
    settings = Settings.load([], environ={})
    assert (settings.host, settings.port, settings.metrics_port) == ("127.0.0.1", 8001, 8002)
    assert settings.providers == ("cpu",)
    assert settings.reflection is True


def test_environment_then_flags() -> None:
    environ = {"NNSERVE_PORT": "9000", "NNSERVE_PROVIDERS": "CUDA, cpu", "NNSERVE_REFLECTION": "false"}
    settings = Settings.load(["--port", "9100", "--model-repository", "/srv/models"], environ=environ)
    assert settings.port == 9100  # the flag wins
    assert settings.providers == ("cuda", "cpu")
    assert settings.reflection is False
    assert settings.model_repository == Path("/srv/models")
    assert Settings.load(["--reflection"], environ=environ).reflection is True


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "port 70000"),
        (["--instances", "-1"], "instances"),
        (["--workers", "0"], "workers"),
        (["--max-queue-size", "0"], "max queue size"),
        (["--log-level", "LOUD"], "log level"),
        (["--max-message-bytes", "10"], "max message bytes"),
        (["--allocator-retain-mb", "-1"], "allocator retain"),
    ],
)
def test_invalid_values_are_refused_with_a_reason(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.load(argv, environ={})


def test_a_choice_is_taken_in_any_case_and_kept_as_declared() -> None:
    """The choices are declared once, on the field: the check and the canonical spelling come from them."""
    settings = Settings.load(["--log-level", "debug", "--transport", "GRPCIO"], environ={"NNSERVE_LOG_FORMAT": "Json"})
    assert (settings.log_level, settings.transport, settings.log_format) == ("DEBUG", "grpcio", "json")
    with pytest.raises(ValueError, match="event loop 'trio' is not one of auto, asyncio, uvloop"):
        Settings(event_loop="trio")


def test_bad_environment_value_names_the_setting() -> None:
    with pytest.raises(ValueError, match="reflection"):
        Settings.load([], environ={"NNSERVE_REFLECTION": "perhaps"})


def test_cpu_quota_reads_cgroup_v2(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(tmp_path) == min(2, cpu_quota(tmp_path / "absent"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) == cpu_quota(tmp_path / "absent")


def test_runtime_sizes_threads_from_the_quota_and_refuses_missing_providers() -> None:
    runtime = Runtime.from_settings(Settings())
    assert runtime.cpus == cpu_quota()
    assert Runtime.from_settings(Settings(cpus=7)).cpus == 7  # Kubernetes passes its CPU limit this way
    assert runtime.providers == ("CPUExecutionProvider",)
    with pytest.raises(StartupError, match="TensorrtExecutionProvider"):
        Runtime.from_settings(Settings(providers=("tensorrt", "cpu")))
    fallback = Runtime.from_settings(Settings(providers=("tensorrt",), allow_provider_fallback=True))
    assert fallback.missing_providers == ("TensorrtExecutionProvider",)
    assert fallback.providers == ("CPUExecutionProvider",)
