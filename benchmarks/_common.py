"""Shared helpers of the benchmark scripts: machine facts, alternating timings, tables, JSON results,
and a real ``python -m llama_cpp.server`` to talk to.

Every comparison is measured the same way: the two sides run alternately (A B A B ...; the first
pair's order is flipped every repetition so neither side always runs first), and the figure kept
is the median of the per-repetition ratios, beside each side's median time. These machines are
shared and noisy: a ratio measured in one run means more than any absolute time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:  # run from a clone without installing: use this checkout's textadapt
    sys.path.insert(0, str(REPO))

LOAD_AT_START = [round(x, 2) for x in os.getloadavg()]  # this module is imported as a script starts
PACKAGES = ("torch", "open_clip_torch", "duckdb", "llama_cpp_python", "openai", "numpy", "prefect")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=None, help="repetitions of each side (median kept)")
    p.add_argument("--out", type=Path, default=None, help="where to write the JSON (default benchmarks/results/NAME.json)")
    return p


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda; on cuda, mixed precision is used")


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        ram_gib = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": LOAD_AT_START,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "textadapt", "prompts"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+uncommitted-changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def write_results(name: str, settings: dict, figures: dict, notes: list[str], out: Path | None = None) -> Path:
    """``benchmarks/results/NAME.json``: what was measured, how, on what, when."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine(),
        "versions": versions(),
        "settings": settings,
        "figures": figures,
        "notes": notes,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (printed by the scripts, pasted by report.py)."""

    def cell(x) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def alternate(a: Callable[[], float], b: Callable[[], float], repeats: int, label_a: str = "a", label_b: str = "b") -> dict:
    """Run ``a`` and ``b`` alternately ``repeats`` times each; each returns its own measured seconds.

    Returns each side's wall times, their medians, and the median of the per-repetition ratios a/b;
    and the same for this process's CPU time (all its threads) during each call, which other jobs
    on the machine disturb much less than wall time (it excludes time spent waiting for a core).
    """
    ta, tb, ca, cb = [], [], [], []
    for i in range(repeats):
        order = [(a, ta, ca), (b, tb, cb)] if i % 2 == 0 else [(b, tb, cb), (a, ta, ca)]
        for fn, times, cpu in order:
            c0 = time.process_time()
            times.append(fn())
            cpu.append(time.process_time() - c0)
        print(
            f"  repetition {i + 1}/{repeats}: {label_a} {ta[-1]:.3f} s ({ca[-1]:.3f} s CPU), {label_b} {tb[-1]:.3f} s "
            f"({cb[-1]:.3f} s CPU), wall ratio {ta[-1] / tb[-1]:.3f}",
            flush=True,
        )
    ratios = [x / y for x, y in zip(ta, tb)]
    cpu_ratios = [x / y for x, y in zip(ca, cb)]
    return {
        f"{label_a}_seconds": ta,
        f"{label_b}_seconds": tb,
        f"{label_a}_median_s": statistics.median(ta),
        f"{label_b}_median_s": statistics.median(tb),
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        f"{label_a}_cpu_seconds": ca,
        f"{label_b}_cpu_seconds": cb,
        "cpu_ratios": cpu_ratios,
        "cpu_ratio_median": statistics.median(cpu_ratios),
    }


def rotate(sides: dict[str, Callable[[], tuple[float, float | None]]], repeats: int, anchor: str) -> dict:
    """``alternate`` for any number of sides: each repetition runs every side once, the order rotated by one each
    time (A B C, B C A, C A B, ...). Each side returns (wall seconds, CPU seconds or None: this process's CPU time
    during the call is taken then). Returns per side its wall and CPU times and their medians, and for every other
    side the median of its per-repetition ratios to ``anchor`` (wall and CPU)."""
    names = list(sides)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            c0 = time.process_time()
            seconds, used = sides[name]()
            wall[name].append(seconds)
            cpu[name].append(used if used is not None else time.process_time() - c0)
        print(
            f"  repetition {i + 1}/{repeats}: " + ", ".join(f"{n} {wall[n][-1]:.2f} s ({cpu[n][-1]:.2f} s CPU)" for n in names),
            flush=True,
        )
    out: dict = {
        "sides": names,
        "anchor": anchor,
        "seconds": wall,
        "cpu_seconds": cpu,
        "median_s": {n: statistics.median(wall[n]) for n in names},
        "cpu_median_s": {n: statistics.median(cpu[n]) for n in names},
        "ratios": {},
        "cpu_ratios": {},
    }
    for n in names:
        if n != anchor:
            out["ratios"][n] = [x / y for x, y in zip(wall[n], wall[anchor])]
            out["cpu_ratios"][n] = [x / y for x, y in zip(cpu[n], cpu[anchor])]
    out["ratio_median"] = {n: statistics.median(r) for n, r in out["ratios"].items()}
    out["cpu_ratio_median"] = {n: statistics.median(r) for n, r in out["cpu_ratios"].items()}
    return out


def children_cpu(match: str) -> Callable[[], float]:
    """A function giving the CPU seconds (user + system) used so far by this process's child processes whose command
    line contains ``match`` (e.g. Prefect's temporary API server), those alive when it is called."""
    import psutil

    def used() -> float:
        total = 0.0
        for child in psutil.Process().children(recursive=True):
            try:
                if match in " ".join(child.cmdline()):
                    t = child.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                pass
        return total

    return used


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(threads: int = 1, n_ctx: int = 1024) -> Iterator[str]:
    """``python -m llama_cpp.server`` serving SmolLM2 as ``smollm2`` on 127.0.0.1, as tests/conftest.py
    starts it (one thread: as fast for this 135M model, and steady beside other busy processes).
    Yields the base URL; the server is stopped on exit."""
    from textadapt.llm import smollm2_path

    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(smollm2_path()),
        "--model_alias",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(threads),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with code {proc.returncode}; log: {log.name}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server did not answer within 60 s; log: {log.name}")
            time.sleep(0.2)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)


def prefect_env() -> None:
    """The environment `textadapt` gives Prefect (``cli._prefect_env``), for scripts that run flows in-process."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def run_cli(args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    """``textadapt ARGS`` in a subprocess, as a user runs it; returns its wall seconds and the process."""
    cmd = [sys.executable, "-m", "textadapt.cli", *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return seconds, p


def cli_env(home: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env["TEXTADAPT_HOME"] = str(home)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PREFECT_HOME", str(home / "prefect"))
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    env.setdefault("DO_NOT_TRACK", "1")
    # Prefect gives its temporary API 20 s to start; on a loaded shared machine that is not always enough.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    for var in ("TEXTADAPT_DB", "TEXTADAPT_CONFIG", "TEXTADAPT_BACKBONE", "TEXTADAPT_LLM"):
        env.pop(var, None)
    env.update(extra)
    return env


def last_run(home: Path) -> dict:
    """The newest row of the runs table, plus the report's per-stage seconds and image-encoder count."""
    import re

    import duckdb

    con = duckdb.connect(str(home / "textadapt.duckdb"), read_only=True)
    try:
        cur = con.execute(
            "SELECT run_id, status, llm_calls, cached_generations, text_encoder_calls, report_path, "
            "epoch(finished_at - started_at) FROM runs ORDER BY started_at DESC LIMIT 1"
        )
        run_id, status, llm_calls, cached, text_calls, report_path, seconds = cur.fetchone()
    finally:
        con.close()
    report = Path(report_path).read_text()
    stages = {}
    if "## Time per stage" in report:
        for line in report.split("## Time per stage", 1)[1].splitlines():
            m = re.match(r"\| (.+?) \| ([\d.]+) \|$", line)
            if m:
                stages[m.group(1)] = float(m.group(2))
    m = re.search(r"Image encoder: (\d+) images encoded", report)
    return {
        "run_id": run_id,
        "status": status,
        "llm_calls": llm_calls,
        "cached_generations": cached,
        "text_encoder_calls": text_calls,
        "image_encoder_calls": int(m.group(1)) if m else None,
        "flow_seconds": seconds,
        "stage_seconds": stages,
    }
