"""`make bench`: nnserve side by side with raw onnxruntime and a bare grpc.aio server, in one run.

Rows, for the MLP (64-256-256-10) and ResNet-18 (3x224x224), random weights, built by our exporters:
  1. raw onnxruntime in this machine's Python, no transport (the floor; its best configuration);
  2. a bare grpc.aio KServe v2 server with no model, answering the same sizes (the transport's ceiling);
  3. nnserve, with batching on and off, and with --workers 2;
each measured with perf_analyzer (Triton's C++ load tool, a standard KServe v2 client) and with our
Python SDK, at concurrency 1, 8 and 32, batch-1 requests. Then the zoo's LSTM and Transformer LMs:
the cost of a generated token after a 16- and a 512-character prompt. Load is closed-loop, bounded
in time, on 127.0.0.1. Each cell records the load generator's CPU use (cores), so a saturated client
shows. The table goes to stdout and everything to a JSON file; the targets of the performance issue
are checked at the end (ratios from this run only: absolute times on a shared machine mean little).
"""

from __future__ import annotations

import argparse
import contextlib
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

from benchmarks import models

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on [\d.]+:(\d+)")


@dataclass
class Cell:
    model: str
    system: str  # raw onnxruntime | bare grpc.aio | nnserve ...
    client: str  # perf_analyzer | sdk | in-process
    concurrency: int
    throughput: float = 0.0  # inferences per second
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: int = 0
    client_cores: float = float("nan")  # CPU seconds of the load generator per wall second
    server_cores: float = float("nan")
    note: str = ""
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


@contextmanager
def _server(command: list[str], log_name: str, out: Path) -> Iterator[tuple[int, int]]:
    """Start a server, wait for its 'listening on' line; yields (port, pid). Stops it after."""
    log_path = out / f"{log_name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            match = LISTENING.search(log_path.read_text(errors="replace"))
            if match:
                time.sleep(0.5)
                yield int(match.group(1)), process.pid
                return
            if process.poll() is not None:
                raise RuntimeError(f"{log_name} exited:\n{log_path.read_text()}")
            time.sleep(0.1)
        raise RuntimeError(f"{log_name} did not start:\n{log_path.read_text()}")
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


class Bench:
    def __init__(self, out: Path, seconds: float, perf_analyzer: str | None) -> None:
        self.out = out
        self.seconds = seconds
        self.perf_analyzer = perf_analyzer
        self.cells: list[Cell] = []

    def _record(self, cell: Cell) -> Cell:
        self.cells.append(cell)
        print(
            f"  {cell.model:16} {cell.system:28} {cell.client:14} c={cell.concurrency:<3} "
            f"{cell.throughput:9.1f}/s  p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
            f"errors {cell.errors}  client {cell.client_cores:.2f} cores {cell.note}",
            flush=True,
        )
        return cell

    def raw(self, model: str, path: Path, concurrency: int, threads: int, batch: int = 1) -> Cell:
        result = self._load(
            ["raw", "--model-path", str(path), "--threads", str(threads), "--batch", str(batch)], concurrency
        )
        cell = Cell(model, "raw onnxruntime", "in-process", concurrency, note=f"{threads} thread(s), batch {batch}")
        return self._record(self._fill(cell, result))

    def sdk(self, model: str, system: str, port: int, server_pid: int, concurrency: int) -> Cell:
        before = _tree_cpu(server_pid)
        path = ROOT / ".cache" / "bench-models" / model / "1" / "model.onnx"
        target = ["--target", f"127.0.0.1:{port}", "--model", model, "--model-path", str(path)]
        result = self._load(["sdk", *target], concurrency)
        cell = self._fill(Cell(model, system, "sdk", concurrency), result)
        cell.server_cores = (_tree_cpu(server_pid) - before) / max(result["wall_s"], 1e-9)
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

    def pa(self, model: str, system: str, port: int, server_pid: int, concurrency: int) -> Cell:
        cell = Cell(model, system, "perf_analyzer", concurrency)
        if self.perf_analyzer is None:
            cell.note = "perf_analyzer unavailable"
            return self._record(cell)
        csv = self.out / f"pa-{model}-{system.replace(' ', '_')}-{concurrency}.csv"
        command = [
            self.perf_analyzer, "-m", model, "-i", "grpc", "-u", f"127.0.0.1:{port}",
            "--concurrency-range", str(concurrency), "-p", str(int(self.seconds * 1000 / 2)),
            "-s", "100", "--max-trials", "4", "-f", str(csv),
        ]  # fmt: skip
        cpu_before, server_before, started = _children_cpu(), _tree_cpu(server_pid), time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=self.seconds * 10 + 60)
        wall = time.perf_counter() - started
        cell.client_cores = (_children_cpu() - cpu_before) / wall
        cell.server_cores = (_tree_cpu(server_pid) - server_before) / wall
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
        return self._record(cell)

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


def _nnserve(repository: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "nnserve_server.cli", "serve", "--model-repository", str(repository),
        "--port", "0", "--metrics-port", "-1", "--log-level", "WARNING", *flags,
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


RUN_ONLY = "run-only grpc.aio"  # the bare server plus one onnxruntime run per request: the floor


def run(out: Path, seconds: float, quick: bool) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    repository = ROOT / ".cache" / "bench-models"
    paths = models.build(repository) | models.language_models(repository)
    try:
        installer = ROOT / "benchmarks" / "install_perf_analyzer.sh"
        perf_analyzer: str | None = subprocess.run(
            ["bash", str(installer), str(ROOT / ".cache" / "perf_analyzer")],
            capture_output=True, text=True, check=True, timeout=300,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        print(f"perf_analyzer could not be installed ({error}); its rows are skipped", flush=True)
        perf_analyzer = None
    bench = Bench(out, seconds, perf_analyzer)
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
    bench.raw(resnet, paths[resnet], 1, 2)
    bench.raw(resnet, paths[resnet], 2, 1)
    bench.raw(resnet, paths[resnet], 1, 2, batch=4)

    print("bare grpc.aio server (no model):", flush=True)
    with _server(_bare(classify_repo), "bare", out) as (port, pid):
        for concurrency in concurrencies:
            bench.pa(mlp, "bare grpc.aio", port, pid, concurrency)
            bench.sdk(mlp, "bare grpc.aio", port, pid, concurrency)
        bench.pa(resnet, "bare grpc.aio", port, pid, 4)
    print(f"{RUN_ONLY} (the bare server plus one onnxruntime run per request, nothing else):", flush=True)
    with _server(_bare(classify_repo, "--run-model"), "run-only", out) as (port, pid):
        for concurrency in (1, 32):
            bench.pa(mlp, RUN_ONLY, port, pid, concurrency)

    configurations = (
        ("nnserve batching", (), concurrencies),
        ("nnserve batching 200us", ("--max-queue-delay-us", "200"), concurrencies[1:]),
        ("nnserve no batching", ("--no-dynamic-batching",), concurrencies),
    )
    for label, flags, levels in configurations:
        print(f"{label}:", flush=True)
        with _server(_nnserve(classify_repo, *flags), label.replace(" ", "-"), out) as (port, pid):
            for concurrency in levels:
                bench.pa(mlp, label, port, pid, concurrency)
                bench.sdk(mlp, label, port, pid, concurrency)
            bench.pa(resnet, label, port, pid, 4)
            if label == "nnserve batching":
                bench.pa(resnet, label, port, pid, 1)
                bench.sdk(resnet, label, port, pid, 4)

    print("nnserve --workers 2:", flush=True)
    with _server(_nnserve(classify_repo, "--workers", "2"), "workers", out) as (port, pid):
        bench.pa(mlp, "nnserve --workers 2", port, pid, 32)
    delayed = ("--max-queue-delay-us", "200")
    with _server(_nnserve(classify_repo, "--workers", "2", *delayed), "workers-200us", out) as (port, pid):
        bench.pa(mlp, "nnserve --workers 2 batching 200us", port, pid, 32)
    with _server(_bare(classify_repo), "bare-again", out) as (port, pid):
        bench.pa(mlp, "bare grpc.aio (again)", port, pid, 1)  # the c=1 gap is small: measure it twice
    with _server(_nnserve(classify_repo), "nnserve-again", out) as (port, pid):
        bench.pa(mlp, "nnserve batching (again)", port, pid, 1)

    print("language models (tokens after a 16- and a 512-character prompt):", flush=True)
    lm_repo = out / "lm-repository"
    shutil.rmtree(lm_repo, ignore_errors=True)
    generation: dict[str, dict[int, Any]] = {}
    for name in ("chars-lstm", "chars-transformer"):
        shutil.copytree(repository / name, lm_repo / name, dirs_exist_ok=True)
    with _server(_nnserve(lm_repo), "lm", out) as (port, _):
        for name in ("chars-lstm", "chars-transformer"):
            generation[name] = bench.generate(name, paths[name], port, (16, 512))

    return {"cells": [asdict(c) for c in bench.cells], "generation": generation}


def _best(
    cells: list[dict[str, Any]], one_process: bool = False, workers: bool = False, **match: Any
) -> dict[str, Any] | None:
    """The fastest cell matching `match`; `one_process`: any one-process nnserve configuration;
    `workers`: any --workers configuration."""
    found = [c for c in cells if all(c[k] == v for k, v in match.items()) and c["throughput"] > 0]
    if one_process:
        found = [c for c in found if c["system"].startswith("nnserve") and "workers" not in c["system"]]
    if workers:
        found = [c for c in found if "--workers" in c["system"]]
    return max(found, key=lambda c: c["throughput"]) if found else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _mlp_p50s_at_1(cells: list[dict[str, Any]], system_prefix: str) -> list[float]:
    """p50s of the MLP at concurrency 1 through perf_analyzer, for every run of that system."""
    return [
        c["p50_ms"]
        for c in cells
        if c["model"] == models.MLP
        and c["system"].startswith(system_prefix)
        and c["client"] == "perf_analyzer"
        and c["concurrency"] == 1
    ]


def targets(results: dict[str, Any]) -> list[tuple[str, bool, str]]:
    cells = results["cells"]
    checks: list[tuple[str, bool, str]] = []
    mlp, resnet = models.MLP, models.RESNET
    raw_resnet = _best(cells, model=resnet, system="raw onnxruntime")
    served = _best(cells, model=resnet, client="perf_analyzer", concurrency=4, one_process=True)
    if raw_resnet and served:
        ratio = served["throughput"] / raw_resnet["throughput"]
        what = f"{ratio:.1%} ({served['system']})"
        checks.append(("ResNet-18 c=4 served >= 95% of raw onnxruntime's best", ratio >= 0.95, what))
    bare = _best(cells, model=mlp, system="bare grpc.aio", client="perf_analyzer", concurrency=32)
    ours = _best(cells, model=mlp, client="perf_analyzer", concurrency=32, one_process=True)
    if bare and ours:
        ratio = ours["throughput"] / bare["throughput"]
        what = f"{ratio:.1%} ({ours['system']})"
        floor = _best(cells, model=mlp, system=RUN_ONLY, concurrency=32)
        if floor:
            what += f"; {RUN_ONLY}: {floor['throughput'] / bare['throughput']:.1%}"
        checks.append(("MLP c=32 one process >= 90% of bare gRPC", ratio >= 0.90, what))
        checks.append(("MLP c=32 one process p99 < 15 ms", ours["p99_ms"] < 15, f"{ours['p99_ms']:.2f} ms"))
    workers = _best(cells, model=mlp, concurrency=32, workers=True)
    if workers:
        checks.append(
            (
                "MLP c=32 --workers 2 >= 3,800/s (Triton)",
                workers["throughput"] >= 3800,
                f"{workers['throughput']:.0f}/s ({workers['system']})",
            )
        )
    bare_p50 = _mlp_p50s_at_1(cells, "bare")
    ours_p50 = _mlp_p50s_at_1(cells, "nnserve batching")
    if bare_p50 and ours_p50:
        gap = _mean(ours_p50) - _mean(bare_p50)
        what = f"+{gap:.3f} ms"
        floor = _best(cells, model=mlp, system=RUN_ONLY, concurrency=1)
        if floor:
            what += f"; {RUN_ONLY}: {floor['p50_ms'] - _mean(bare_p50):+.3f} ms"
        checks.append(("MLP c=1 p50 <= bare + 0.15 ms (mean of two runs each)", gap <= 0.15, what))
    for name, by_prefix in results["generation"].items():
        ratio = by_prefix[512]["token_ms"] / by_prefix[16]["token_ms"]
        checks.append((f"{name}: token at prefix 512 <= 1.5x prefix 16", ratio <= 1.5, f"{ratio:.2f}x"))
    return checks


def table(results: dict[str, Any]) -> str:
    cells = results["cells"]
    lines = [
        "| model | system | client | conc | inferences/s | p50 ms | p99 ms | errors | vs raw best | vs bare "
        "| client cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        raw = _best(cells, model=c["model"], system="raw onnxruntime")
        bare = _best(cells, model=c["model"], system="bare grpc.aio", client=c["client"], concurrency=c["concurrency"])
        vs_raw = f"{c['throughput'] / raw['throughput']:.1%}" if raw and c["throughput"] else ""
        vs_bare = (
            f"{c['throughput'] / bare['throughput']:.1%}"
            if bare and c["throughput"] and c["system"] != "raw onnxruntime"
            else ""
        )
        lines.append(
            f"| {c['model']} | {c['system']}{' (' + c['note'] + ')' if c['note'] else ''} | {c['client']} | "
            f"{c['concurrency']} | {c['throughput']:.0f} | {c['p50_ms']:.3f} | {c['p99_ms']:.3f} | {c['errors']} | "
            f"{vs_raw} | {vs_bare} | {c['client_cores']:.2f} |"
        )
    lines += ["", "| language model | prefix | ms/token | tokens/s | first token ms |", "|---|---|---|---|---|"]
    for name, by_prefix in results["generation"].items():
        for prefix, g in by_prefix.items():
            lines.append(
                f"| {name} | {prefix} | {g['token_ms']:.3f} | {g['tokens_per_s']:.0f} | {g['first_token_ms']:.2f} |"
            )
    lines += ["", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else 'NO'} | {value} |" for name, ok, value in targets(results)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per cell")
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 32 only")
    args = parser.parse_args()
    started = time.perf_counter()
    results = run(args.out, args.seconds, args.quick)
    results["targets"] = [{"target": n, "met": ok, "measured": v} for n, ok, v in targets(results)]
    results["elapsed_s"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    report = table(results)
    (args.out / "results.md").write_text(report + "\n")
    print("\n" + report)
    print(f"\n{results['elapsed_s']:.0f} s; results in {args.out}/results.json and results.md")


if __name__ == "__main__":
    main()
