"""`make bench`: nnserve side by side with raw onnxruntime, a bare KServe server and Triton, in one run.

Rows, for the MLP (64-256-256-10) and ResNet-18 (3x224x224), random weights, built by our exporters:
  1. raw onnxruntime in this machine's Python, no transport (the floor; its best configuration);
  2. a bare KServe v2 server with no model, answering the same sizes (the transport's ceiling), on each
     transport: pygrpc-native (nnserve's default) and grpc.aio;
  3. the same bare server running the model once per request (the run-only floor);
  4. nnserve on each transport, and on the native one with a batching delay, without batching and
     with --workers 2;
  5. Triton 2.51 (`triton_peer.py`: PyPI's tritonserver, Python backend running onnxruntime);
each measured with perf_analyzer (Triton's C++ load tool, a standard KServe v2 client) and some with
our Python SDK, batch-1 requests; the ResNet also with its tensors in system shared
memory (perf_analyzer --shared-memory system, client "perf_analyzer shm"), and the MLP
over ModelStreamInfer (perf_analyzer --streaming, client "perf_analyzer stream"). Then the zoo's LSTM and
Transformer LMs: the cost of a generated token after a 16- and a 512-character prompt, and concurrent
streams. Load is closed-loop, bounded in time, on 127.0.0.1.
Each cell records the load generator's CPU (cores) and the server's CPU per inference (all its
processes, from the kernel's counters, divided by the inferences it answered), so a saturated client
and a dear request path both show. The table goes to stdout and everything to a JSON file; the
targets are checked at the end (ratios from this run only: absolute times on a shared machine mean little).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks import load, models, triton_peer
from benchmarks.targets import BARE, NATIVE, RUN_ONLY, SHM_CLIENT, TRITON, best, paired, targets
from nnserve_server.edge import listening

ROOT = Path(__file__).resolve().parent.parent
STREAM_CLIENT = "perf_analyzer stream"  # --streaming: every request on one ModelStreamInfer stream per client
C_FRONT = "C++ front end"  # Triton's stack
UNSTABLE = "Failed to obtain stable measurement"  # perf_analyzer's words when its windows disagree


@dataclass
class Cell:
    model: str
    system: str  # raw onnxruntime | bare grpc.aio | nnserve ...
    client: str  # perf_analyzer | perf_analyzer shm (--shared-memory system) | sdk | in-process
    concurrency: int
    throughput: float = 0.0  # inferences per second
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: int = 0
    client_cores: float = float("nan")  # CPU seconds of the load generator per wall second
    server_cores: float = float("nan")
    server_us: float = float("nan")  # server CPU (all its processes) per inference answered, microseconds
    stack: str = ""  # grpcio and event loop the server ran on (Python servers)
    note: str = ""
    pair: int = 0  # the round of the close targets' interleaved pairs it belongs to (0: none)
    extra: dict[str, Any] = field(default_factory=dict)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """CPU seconds of a process and its threads (and its waited-for children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _tree_cpu(pid: int) -> float:
    total = _process_cpu(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    for child in children:
        with contextlib.suppress(OSError, ValueError):
            total += _tree_cpu(int(child))
    return total


PINNED = "grpcio 1.75.0, uvloop"  # grpc.aio as constraints.txt pins it (--transport grpcio), on uvloop
NEWEST_GRPCIO = "1.85.3"  # the newest grpcio measured beside it, from an overlay folder


def _overlay(version: str) -> Path:
    """A folder holding only grpcio `version`, put first on PYTHONPATH: the same venv on another grpcio."""
    folder = ROOT / ".cache" / "stacks" / f"grpcio-{version}"
    if not (folder / "grpc").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--target", str(folder), f"grpcio=={version}"],
            check=True, timeout=300,
        )  # fmt: skip
    return folder


def _served(port: int, model: str) -> int | None:
    """Inferences the server has answered for `model` (KServe ModelStatistics); None where it does not say
    (a --workers server answers for one worker only, so its cells estimate from the throughput)."""
    from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
    from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(name=model), timeout=10
            )
    except grpc.RpcError:
        return None
    return sum(s.inference_count for s in stats.model_stats) if stats.model_stats else None


def _per_inference(cpu_s: float, before: int | None, after: int | None, estimate: float) -> float:
    answered = after - before if before is not None and after is not None else estimate
    return cpu_s / answered * 1e6 if answered > 0 else float("nan")


@contextmanager
def _server(command: list[str], log_name: str, out: Path, grpcio: str = "") -> Iterator[tuple[int, int]]:
    """Start a server, wait for its 'listening on' line; yields (port, pid). Stops it after.
    `grpcio`: run it on that grpcio release instead of the pinned one."""
    log_path = out / f"{log_name}.log"
    env = {**os.environ, "PYTHONPATH": str(_overlay(grpcio))} if grpcio else None
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            said = listening.find(log_path.read_text(errors="replace"))
            if said is not None:
                time.sleep(0.5)
                yield said.port, process.pid
                return
            if process.poll() is not None:
                raise RuntimeError(f"{log_name} exited:\n{log_path.read_text()}")
            time.sleep(0.1)
        raise RuntimeError(f"{log_name} did not start:\n{log_path.read_text()}")
    finally:
        triton_peer.stop(process)


class Bench:
    def __init__(self, out: Path, seconds: float, perf_analyzer: str | None) -> None:
        self.out = out
        self.seconds = seconds
        self.perf_analyzer = perf_analyzer
        self.cells: list[Cell] = []
        self._written: set[str] = set()  # models whose perf_analyzer input data this run wrote

    def _record(self, cell: Cell) -> Cell:
        self.cells.append(cell)
        print(
            f"  {cell.model:16} {cell.system:28} {cell.client:14} c={cell.concurrency:<3} "
            f"{cell.throughput:9.1f}/s  p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
            f"errors {cell.errors}  client {cell.client_cores:.2f} cores  server {cell.server_us:5.0f} us/inf "
            f"{cell.note}",
            flush=True,
        )
        return cell

    def raw(self, model: str, path: Path, concurrency: int, threads: int, batch: int = 1, pair: int = 0) -> Cell:
        result = self._load(
            ["raw", "--model-path", str(path), "--threads", str(threads), "--batch", str(batch)], concurrency
        )
        note = f"{threads} thread(s), batch {batch}" + (f", pair {pair}" if pair else "")
        cell = Cell(model, "raw onnxruntime", "in-process", concurrency, note=note, pair=pair)
        return self._record(self._fill(cell, result))

    def sdk(self, model: str, system: str, port: int, server_pid: int, concurrency: int, stack: str = PINNED) -> Cell:
        before, served = _tree_cpu(server_pid), _served(port, model)
        path = ROOT / ".cache" / "bench-models" / model / "1" / "model.onnx"
        target = ["--target", f"127.0.0.1:{port}", "--model", model, "--model-path", str(path)]
        result = self._load(["sdk", *target], concurrency)
        cell = self._fill(Cell(model, system, "sdk", concurrency, stack=stack), result)
        cpu = _tree_cpu(server_pid) - before
        cell.server_cores = cpu / max(result["elapsed"], 1e-9)
        cell.server_us = _per_inference(cpu, served, _served(port, model), cell.throughput * result["wall_s"])
        return self._record(cell)

    def _load(self, args: list[str], concurrency: int) -> dict[str, Any]:
        command = [sys.executable, "-m", "benchmarks.load", *args]
        command += ["--concurrency", str(concurrency), "--seconds", str(self.seconds)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=self.seconds * 4 + 60)
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed: {done.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result["elapsed"] = time.perf_counter() - started
        return result

    @staticmethod
    def _fill(cell: Cell, result: dict[str, Any]) -> Cell:
        cell.throughput = result["throughput"]
        cell.p50_ms, cell.p99_ms = result["p50_ms"], result["p99_ms"]
        cell.errors = sum(result["errors"].values())
        cell.client_cores = result["cpu_s"] / result["elapsed"]
        return cell

    def pa(
        self,
        model: str,
        system: str,
        port: int,
        server_pid: int,
        concurrency: int,
        stack: str = PINNED,
        counted: bool = True,
        shared_memory: bool = False,
        streaming: bool = False,
        pair: int = 0,
    ) -> Cell:
        """`counted`: the server's ModelStatistics covers all its processes (not so with --workers).
        `shared_memory`: inputs and outputs in system shared memory (perf_analyzer registers the regions).
        `pair`: the round of the close targets' pairs it is measured in."""
        client = SHM_CLIENT if shared_memory else STREAM_CLIENT if streaming else "perf_analyzer"
        cell = Cell(model, system, client, concurrency, stack=stack, note=f"pair {pair}" if pair else "", pair=pair)
        if self.perf_analyzer is None:
            cell.note = "perf_analyzer unavailable"
            return self._record(cell)
        name = f"{model}-{system}-{client}-{concurrency}" + (f"-pair{pair}" if pair else "")
        csv = self.out / f"pa-{name.replace(' ', '_')}.csv"
        command = [
            self.perf_analyzer, "-m", model, "-i", "grpc", "-u", f"127.0.0.1:{port}",
            "--input-data", str(self._input_data(model)),
            "--concurrency-range", str(concurrency), "-p", str(int(self.seconds * 1000 / 2)),
            "-s", "100", "--max-trials", "4", "-f", str(csv),
            *(["--shared-memory", "system"] if shared_memory else []),
            *(["--streaming"] if streaming else []),
        ]  # fmt: skip
        for attempt in range(2):
            served = _served(port, model) if counted else None
            cpu_before, server_before, started = _children_cpu(), _tree_cpu(server_pid), time.perf_counter()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=self.seconds * 20 + 60)
            except subprocess.TimeoutExpired:  # a row that hangs is recorded as failed; the others still run
                cell.errors, cell.note = 1, "perf_analyzer timed out"
                return self._record(cell)
            wall = time.perf_counter() - started
            server_cpu = _tree_cpu(server_pid) - server_before
            cell.client_cores = (_children_cpu() - cpu_before) / wall
            cell.server_cores = server_cpu / wall
            if csv.is_file() or attempt or UNSTABLE not in done.stdout:
                break
            # Its windows disagreed (a saturated client on a shared machine): once more, with windows twice as long.
            interval = command.index("-p") + 1
            command[interval] = str(int(command[interval]) * 2)
            cell.note = (cell.note + ", " if cell.note else "") + "measured again with longer windows (unstable)"
        if not csv.is_file():
            cell.errors = 1
            cell.note = f"perf_analyzer failed ({done.returncode}): {done.stdout[-300:]} {done.stderr[-300:]}".replace(
                "\n", " "
            )
            return self._record(cell)
        header, row = csv.read_text().splitlines()[:2]
        values = dict(zip(header.split(","), row.split(","), strict=False))
        cell.throughput = float(values["Inferences/Second"])
        cell.p50_ms = float(values["p50 latency"]) / 1000
        cell.p99_ms = float(values["p99 latency"]) / 1000
        errors = re.search(r"(\d+) failed", done.stdout)
        cell.errors = int(errors.group(1)) if errors else 0
        after = _served(port, model) if counted else None
        cell.server_us = _per_inference(server_cpu, served, after, cell.throughput * wall)
        return self._record(cell)

    def _input_data(self, model: str) -> Path:
        """perf_analyzer's input folder for `model`: one file per input, a batch-1 request's raw bytes, of
        the values raw onnxruntime runs (`load.example_inputs`), not perf_analyzer's random bytes."""
        folder = self.out / "input-data" / model
        if model not in self._written:  # once per run: the models may have been rebuilt since the last
            write_input_data(ROOT / ".cache" / "bench-models" / model / "1" / "model.onnx", folder)
            self._written.add(model)
        return folder

    def streams(self, model: str, port: int, concurrency: int, batching: bool, versus: int = 0) -> dict[str, Any]:
        """`concurrency` streams at once, five bursts; with `versus`, seven, each paired with a burst of
        `versus` streams (the targets' ratios, side by side)."""
        command = [
            sys.executable, "-m", "benchmarks.load", "streams", "--target", f"127.0.0.1:{port}", "--model", model,
            "--concurrency", str(concurrency), "--tokens", "128", "--repeats", "7" if versus else "5",
            "--versus", str(versus),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"streams load failed: {done.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result |= {"model": model, "step_batching": batching}
        print(
            f"  {model:18} step batching {'on ' if batching else 'off'} {concurrency:3} streams: "
            f"{result['tokens_per_s']:7.0f} tokens/s, first token p50 {result['first_token_p50_ms']:7.1f} ms "
            f"p99 {result['first_token_p99_ms']:7.1f} ms, between tokens p50 {result['inter_token_p50_ms']:.2f} ms, "
            f"pieces per token {result['pieces_per_token']:.2f}, client cores {result['client_cores']:.2f}, "
            f"errors {result['errors']}",
            flush=True,
        )
        if versus:
            ratios = paired(result)
            print(
                f"  {'':18} paired with {versus} stream: tokens/s {ratios['tokens_per_s']:.1f}x, "
                f"gap between tokens {ratios['inter_token_p50']:.1f}x (medians of {len(result['pairs'])} pairs)",
                flush=True,
            )
        return result

    def generate(self, model: str, path: Path, port: int, prefixes: tuple[int, ...]) -> dict[int, Any]:
        command = [
            sys.executable, "-m", "benchmarks.load", "generate", "--target", f"127.0.0.1:{port}", "--model", model,
            "--model-path", str(path), "--prefixes", ",".join(map(str, prefixes)), "--tokens", "64",
            "--repeats", "7",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"generate load failed: {done.stderr[-2000:]}")
        raw: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        results = {prefix: raw[str(prefix)] for prefix in prefixes}
        for prefix, result in results.items():
            print(
                f"  {model:16} prefix {prefix:4}: {result['token_ms']:.3f} ms/token "
                f"({result['tokens_per_s']:.0f} tokens/s), first token {result['first_token_ms']:.2f} ms",
                flush=True,
            )
        return results


def write_input_data(model_path: Path, folder: Path) -> None:
    """perf_analyzer's `--input-data` folder for a model: a file per input, named after it, holding a
    batch-1 request's raw bytes of `load.example_inputs`."""
    import onnxruntime as ort

    specs = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).get_inputs()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, array in load.example_inputs(specs).items():
        (folder / name).write_bytes(array.tobytes())


def _nnserve(repository: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "nnserve_server.process.cli", "serve", "--model-repository", str(repository),
        "--port", "0", "--metrics-port", "-1", "--log-level", "WARNING",
        # perf_analyzer's --shared-memory system names its objects after the tensors ('/input', '/logits')
        "--shared-memory", "--shared-memory-keys", "*", *flags,
    ]  # fmt: skip


def _bare(repository: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.bare_server",
        "--model-repository",
        str(repository),
        "--port",
        "0",
        *flags,
    ]


def _perf_analyzer() -> str | None:
    try:
        installer = ROOT / "benchmarks" / "install_perf_analyzer.sh"
        return subprocess.run(
            ["bash", str(installer), str(ROOT / ".cache" / "perf_analyzer")],
            capture_output=True, text=True, check=True, timeout=300,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        print(f"perf_analyzer could not be installed ({error}); its rows are skipped", flush=True)
        return None


def _triton(bench: Bench, paths: dict[str, Path], out: Path, label: str, levels: tuple[int, ...]) -> None:
    mlp, resnet = models.MLP, models.RESNET
    repository = out / "triton-repository"
    triton_peer.make_repository(
        {mlp: (paths[mlp], 64, [64], [10]), resnet: (paths[resnet], 8, [3, 224, 224], [1000])}, repository
    )
    try:
        with triton_peer.serve(ROOT / ".cache" / "triton", repository, out / "triton.log") as (port, pid):
            for concurrency in levels:
                bench.pa(mlp, label, port, pid, concurrency, stack=C_FRONT)
            if label == TRITON:  # the first run only: the second repeats the MLP cells the targets compare
                bench.pa(resnet, label, port, pid, 4, stack=C_FRONT)
                bench.pa(resnet, label, port, pid, 4, stack=C_FRONT, shared_memory=True)
                # Last: perf_analyzer --streaming on this Python-backend model did not finish in one run here.
                bench.pa(mlp, label, port, pid, 32, stack=C_FRONT, streaming=True)
    except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        print(f"Triton could not be run ({str(error)[:300]}); its rows are skipped", flush=True)


def run(out: Path, seconds: float, quick: bool, generation_only: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    repository = ROOT / ".cache" / "bench-models"
    if generation_only:
        paths = models.language_models(repository)
        generation, concurrent = _generation(Bench(out, seconds, None), repository, paths, out)
        return {"cells": [], "generation": generation, "streams": concurrent}
    paths = models.build(repository) | models.language_models(repository)
    bench = Bench(out, seconds, _perf_analyzer())
    mlp, resnet = models.MLP, models.RESNET
    concurrencies = (1, 32) if quick else (1, 8, 32)
    # Only the two benchmark models are served (the LMs get their own server below).
    classify_repo = out / "repository"
    shutil.rmtree(classify_repo, ignore_errors=True)
    for name in (mlp, resnet):  # copies: the server refuses symlinks that leave its repository
        shutil.copytree(repository / name, classify_repo / name, dirs_exist_ok=True)

    print("raw onnxruntime (in-process):", flush=True)
    bench.raw(mlp, paths[mlp], 1, 1)
    bench.raw(mlp, paths[mlp], 2, 1)
    raw_resnet = {config: bench.raw(resnet, paths[resnet], *config) for config in RAW_RESNET}

    print("bare KServe server (no model) on each transport:", flush=True)
    transports: tuple[tuple[tuple[str, ...], str], ...] = ((("--native",), NATIVE), ((), PINNED))
    for bare_flags, stack in transports:
        bare = _bare(classify_repo, "--event-loop", "uvloop", *bare_flags)
        with _server(bare, f"bare-{stack[:6]}", out) as (port, pid):
            for concurrency in concurrencies:
                bench.pa(mlp, BARE, port, pid, concurrency, stack=stack)
            bench.pa(resnet, BARE, port, pid, 4, stack=stack)
    print(f"{RUN_ONLY} (the bare native server plus one onnxruntime run per request, nothing else):", flush=True)
    with _server(_bare(classify_repo, "--run-model", "--event-loop", "uvloop", "--native"), "run-only", out) as (
        port,
        pid,
    ):
        bench.pa(mlp, RUN_ONLY, port, pid, 32, stack=NATIVE)

    print(f"{TRITON} (Python backend running onnxruntime):", flush=True)
    _triton(bench, paths, out, TRITON, concurrencies)

    configurations: tuple[tuple[str, tuple[str, ...], tuple[int, ...], str], ...] = (
        ("nnserve", (), concurrencies, NATIVE),
        ("nnserve", ("--transport", "grpcio"), (1, 32), PINNED),
        ("nnserve batching 200us", ("--max-queue-delay-us", "200"), (32,), NATIVE),
        ("nnserve no batching", ("--no-dynamic-batching",), (32,), NATIVE),
    )
    for label, flags, levels, stack in configurations:
        print(f"{label} on {stack}:", flush=True)
        with _server(_nnserve(classify_repo, *flags), f"{label}-{stack[:6]}".replace(" ", "-"), out) as (port, pid):
            for concurrency in levels:
                bench.pa(mlp, label, port, pid, concurrency, stack=stack)
            bench.pa(resnet, label, port, pid, 4, stack=stack)
            if label == "nnserve" and stack == NATIVE:
                bench.pa(mlp, label, port, pid, 32, stack=stack, streaming=True)
                bench.pa(resnet, label, port, pid, 4, stack=stack, shared_memory=True)
                bench.sdk(mlp, label, port, pid, 1, stack=stack)
                bench.sdk(mlp, label, port, pid, 32, stack=stack)
                bench.pa(resnet, label, port, pid, 1, stack=stack)

    print("nnserve --workers 2:", flush=True)
    with _server(_nnserve(classify_repo, "--workers", "2"), "workers", out) as (port, pid):
        bench.pa(mlp, "nnserve --workers 2", port, pid, 32, stack=NATIVE, counted=False)
    best_raw = max(raw_resnet, key=lambda config: raw_resnet[config].throughput)
    _pairs(bench, classify_repo, paths, out, best_raw, 1 if quick else PAIRS)

    generation, concurrent = _generation(bench, repository, paths, out)
    return {"cells": [asdict(c) for c in bench.cells], "generation": generation, "streams": concurrent}


RAW_RESNET = ((1, 2, 1), (2, 1, 1), (1, 2, 4))  # (concurrency, threads, batch): raw onnxruntime's configurations
PAIRS = 4  # rounds of the close targets' interleaved pairs (each order twice)


def _pairs(
    bench: Bench, classify_repo: Path, paths: dict[str, Path], out: Path, raw: tuple[int, int, int], rounds: int
) -> None:
    """The close targets' cells in `rounds` rounds, with every server up at once: in each round nnserve's cell
    and its reference's (Triton, the bare native server, raw onnxruntime's best configuration `raw`) run back to
    back, in turns which goes first, so a slow moment of the shared machine hits both; `targets.py` judges the
    median ratio of the rounds.
    Idle servers wait in epoll and cost the one measured nothing."""
    mlp, resnet = models.MLP, models.RESNET
    print(f"the close targets, {rounds} rounds of interleaved pairs:", flush=True)
    with contextlib.ExitStack() as servers:
        port, pid = servers.enter_context(_server(_nnserve(classify_repo), "nnserve-pairs", out))
        bare = servers.enter_context(
            _server(_bare(classify_repo, "--event-loop", "uvloop", "--native"), "bare-pairs", out)
        )
        triton: tuple[int, int] | None = None
        try:
            repository = out / "triton-repository"
            triton_peer.make_repository({mlp: (paths[mlp], 64, [64], [10])}, repository)
            triton = servers.enter_context(
                triton_peer.serve(ROOT / ".cache" / "triton", repository, out / "triton-pairs.log")
            )
        except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            print(f"Triton could not be run ({str(error)[:300]}); its pairs are skipped", flush=True)
        for pair in range(1, rounds + 1):
            # Which side goes first alternates by round: a cell run right after a heavy one was measured
            # slower here (Triton after nnserve's c=32: 4,714 and 5,349/s against 7,537 and 7,810/s before it).
            first = pair % 2 == 1
            cell = functools.partial(bench.pa, pair=pair)
            for concurrency in (32, 1):
                ours = functools.partial(cell, mlp, "nnserve", port, pid, concurrency, stack=NATIVE)
                refs = []
                if triton is not None:
                    refs.append(functools.partial(cell, mlp, TRITON, *triton, concurrency, stack=C_FRONT))
                if concurrency == 32:
                    refs.append(functools.partial(cell, mlp, BARE, *bare, concurrency, stack=NATIVE))
                for measure in [ours, *refs] if first else [*refs, ours]:
                    measure()
            raw_cell = functools.partial(bench.raw, resnet, paths[resnet], *raw, pair=pair)
            served = [
                functools.partial(cell, resnet, "nnserve", port, pid, 4, stack=NATIVE, shared_memory=shm)
                for shm in (False, True)
            ]
            for measure in [*served, raw_cell] if first else [raw_cell, *served]:
                measure()


def _generation(
    bench: Bench, repository: Path, paths: dict[str, Path], out: Path
) -> tuple[dict[str, dict[int, Any]], list[dict[str, Any]]]:
    """The language models' section: tokens after a short and a long prompt; concurrent streams."""
    print("language models (tokens after a 16- and a 512-character prompt):", flush=True)
    lm_repo = out / "lm-repository"
    shutil.rmtree(lm_repo, ignore_errors=True)
    generation: dict[str, dict[int, Any]] = {}
    for name in ("chars-lstm", "chars-transformer"):
        shutil.copytree(repository / name, lm_repo / name, dirs_exist_ok=True)
    with _server(_nnserve(lm_repo), "lm", out) as (port, _):
        for name in ("chars-lstm", "chars-transformer"):
            generation[name] = bench.generate(name, paths[name], port, (16, 512))
    print("concurrent generations (128 greedy tokens each), decoding steps shared and not:", flush=True)
    concurrent: list[dict[str, Any]] = []
    for batching in (True, False):
        flags = () if batching else ("--no-step-batching",)
        with _server(_nnserve(lm_repo, *flags), f"lm-streams-{batching}", out) as (port, _):
            for name in ("chars-lstm", "chars-transformer"):
                for streams in (1, 4, 16, 64):
                    # The targets' cell (16 against 1) in interleaved pairs, with step batching.
                    versus = 1 if batching and streams == 16 else 0
                    concurrent.append(bench.streams(name, port, streams, batching, versus))

    return generation, concurrent


def table(results: dict[str, Any]) -> str:
    cells = results["cells"]
    lines = [
        "| model | system | stack | client | conc | inferences/s | p50 ms | p99 ms | errors | vs raw best | vs Triton "
        "| server us/inf | vs run-only CPU | client cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        raw = best(cells, model=c["model"], system="raw onnxruntime")
        peer = best(cells, model=c["model"], system=TRITON, client=c["client"], concurrency=c["concurrency"])
        floor = best(cells, model=c["model"], system=RUN_ONLY, client=c["client"], concurrency=c["concurrency"])
        served = c["throughput"] and c["system"] != "raw onnxruntime"
        vs_raw = f"{c['throughput'] / raw['throughput']:.1%}" if raw and c["throughput"] else ""
        vs_peer = f"{c['throughput'] / peer['throughput']:.2f}x" if peer and served else ""
        vs_floor = f"{c['server_us'] / floor['server_us']:.2f}x" if floor and served and c["server_us"] > 0 else ""
        server_us = f"{c['server_us']:.0f}" if c["server_us"] == c["server_us"] else ""
        lines.append(
            f"| {c['model']} | {c['system']}{' (' + c['note'] + ')' if c['note'] else ''} | {c.get('stack', '')} | "
            f"{c['client']} | {c['concurrency']} | {c['throughput']:.0f} | {c['p50_ms']:.3f} | {c['p99_ms']:.3f} | "
            f"{c['errors']} | {vs_raw} | {vs_peer} | {server_us} | {vs_floor} | {c['client_cores']:.2f} |"
        )
    lines += ["", "| language model | prefix | ms/token | tokens/s | first token ms |", "|---|---|---|---|---|"]
    for name, by_prefix in results["generation"].items():
        for prefix, g in by_prefix.items():
            lines.append(
                f"| {name} | {prefix} | {g['token_ms']:.3f} | {g['tokens_per_s']:.0f} | {g['first_token_ms']:.2f} |"
            )
    lines += ["", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else 'NO'} | {value} |" for name, ok, value in targets(results)]
    lines += [
        "",
        "| language model | step batching | streams | tokens/s | first token p50 ms | p99 ms "
        "| between tokens p50 ms | pieces per token | client cores | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.get("streams", []):
        lines.append(
            f"| {r['model']} | {'on' if r['step_batching'] else 'off'} | {r['streams']} | {r['tokens_per_s']:.0f} | "
            f"{r['first_token_p50_ms']:.1f} | {r['first_token_p99_ms']:.1f} | {r['inter_token_p50_ms']:.2f} | "
            f"{r.get('pieces_per_token', 1.0):.2f} | {r.get('client_cores', 0.0):.2f} | {r['errors'] or ''} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per cell")
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 32 only")
    parser.add_argument(
        "--generation-only", action="store_true", help="the language models' section alone (no peers to install)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    results = run(args.out, args.seconds, args.quick, args.generation_only)
    results["targets"] = [{"target": n, "met": ok, "measured": v} for n, ok, v in targets(results)]
    results["elapsed_s"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    report = table(results)
    (args.out / "results.md").write_text(report + "\n")
    dated = _keep_dated(report, results, args)
    print("\n" + report)
    print(f"\n{results['elapsed_s']:.0f} s; results in {args.out}/results.json and results.md, and {dated}")


RESULTS = ROOT / "benchmarks" / "results"


def _keep_dated(report: str, results: dict[str, Any], args: argparse.Namespace) -> Path:
    """The run's tables in benchmarks/results/<date>-<commit>.md, with what it ran on, to commit beside the
    change it measured (docs/performance.md links the latest)."""
    commit = (
        subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or "unknown"
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
        check=False,
    ).stdout.strip()  # fmt: skip
    day = time.strftime("%Y-%m-%d")
    path = RESULTS / f"{day}-{commit}{'-dirty' if dirty else ''}.md"
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v)
    header = [
        f"# make bench, {day}, commit {commit}{' (with uncommitted changes)' if dirty else ''}",
        "",
        f"{os.cpu_count()} CPUs seen, {len(os.sched_getaffinity(0))} usable; load generator and servers on the"
        f" same machine; {results['elapsed_s']:.0f} s; flags: {flags or 'none'}. How to read it: benchmarks/README.md.",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header) + report + "\n")
    return path


if __name__ == "__main__":
    main()
