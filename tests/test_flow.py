"""The whole flow, through the real CLI, on a small Fashion-MNIST subset: the real SmolLM2, a real
DuckDB file, Prefect's temporary local API, and a tiny randomly initialised open_clip backbone."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY

from textadapt.encoders import _hub_reachable
from textadapt.store import Store

CLI = str(Path(sys.executable).parent / "textadapt")
SMALL = ["--backbone", TINY, "--max-classes", "3", "--samples", "2", "--max-images", "300", "--steps", "30"]


def textadapt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([CLI, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=900, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"textadapt {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def query(home: Path, sql: str) -> list[tuple]:
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        return s.sql(sql)[1]


def test_run_caches_everything_and_reports_every_method(home, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "INFO")  # a user's console (the tests' default is WARNING)
    first = textadapt("run", "fashion-mnist", *SMALL)
    assert "UNTRAINED BACKBONE" in first.stderr
    # the console: one line per stage, no per-task chatter (Prefect's task states are at DEBUG)
    assert "Task run" not in first.stderr.replace("Task run 'train adapters", "") and "Traceback" not in first.stderr
    for stage in ("generation: 60 LLM calls", "text embedding: ", "image embedding: 300 images encoded", "report: "):
        assert first.stderr.count(stage) == 1, (stage, first.stderr)
    report = Path(re.search(r"report: (\S+\.md)", first.stdout).group(1))
    text = report.read_text()
    assert text.startswith("**UNTRAINED BACKBONE")
    methods = (
        "zero-shot:class-name",
        "zero-shot:a-photo-of",
        "zero-shot:ensemble",
        "waffle",
        "cupl:generic",
        "cupl:targeted",
        "tap-head:generic",
        "tap-head:targeted",
    )
    for method in methods:
        assert f"| `{method}` |" in text

    # 3 classes x 10 questions x 2 samples, each stored once; the report's count agrees with SQL.
    assert query(home, "SELECT count(*) FROM generations") == [(60,)]
    trained = int(re.search(r"Trained on (\d+) descriptions", text).group(1))
    used = f"SELECT count(*) FROM run_generations r JOIN descriptions d USING (key) WHERE r.run_id = '{report.stem}' AND r.excluded IS NULL"
    assert query(home, used) == [(trained,)]
    accepted, duplicates = query(
        home,
        "SELECT count(*) FILTER (rejected IS NULL), count(*) FILTER (excluded LIKE 'duplicate of%') "
        f"FROM generations JOIN run_generations USING (key) WHERE run_generations.run_id = '{report.stem}'",
    )[0]
    assert accepted - duplicates == trained
    assert query(home, "SELECT count(DISTINCT template), count(DISTINCT class_name) FROM generations") == [(10, 3)]
    run_id = report.stem
    assert sorted(query(home, f"SELECT method FROM results WHERE run_id = '{run_id}'")) == sorted((m,) for m in methods)
    assert query(home, f"SELECT count(*) FROM class_results WHERE run_id = '{run_id}'") == [(3 * len(methods),)]
    # the adapters trained with 3 seeds (the default), and the report gives their spread
    assert query(
        home, f"SELECT seeds, len(top1_per_seed) FROM results WHERE run_id = '{run_id}' AND method = 'tap-head:targeted'"
    ) == [([7777, 7778, 7779], 3)]
    assert query(home, f"SELECT count(*) FROM run_generations WHERE run_id = '{run_id}'") == [(60,)]

    assert "tap-head:generic: trained 3 seed(s) in" in first.stderr

    # Nothing changed: no LLM call, no text encoded, no head trained (each read back from the cache).
    again = textadapt("run", "fashion-mnist", *SMALL)
    assert "0 LLM calls" in again.stdout and "0 texts encoded" in again.stdout
    for method in ("tap-head:generic", "tap-head:targeted"):
        assert f"{method}: 3 seed(s) from the cache (trained in" in again.stderr, again.stderr
    assert query(home, "SELECT count(*), count(DISTINCT run_id) FROM trained_heads") == [(6, 1)]
    rows = query(home, "SELECT status, llm_calls, cached_generations, text_encoder_calls FROM runs ORDER BY started_at")
    assert rows[0][:2] == ("completed", 60) and rows[0][3] > 0
    assert rows[1] == ("completed", 0, 60, 0)

    # Editing one template regenerates exactly that template's rows.
    prompts = tmp_path / "prompts"
    shutil.copytree(REPO / "prompts", prompts)
    look = prompts / "targeted" / "look.j2"
    look.write_text(look.read_text().replace("look like", "look like, seen from the front,"))
    monkeypatch.setenv("TEXTADAPT_PROMPTS_DIR", str(prompts))
    edited = textadapt("run", "fashion-mnist", *SMALL, "--templates", "targeted")
    assert "6 LLM calls, 24 cached" in edited.stdout  # 3 classes x 2 samples of targeted/look
    assert "tap-head:targeted: trained 3 seed(s) in" in edited.stderr  # on the edited descriptions
    assert query(home, "SELECT count(*) FROM generations") == [(66,)]

    # --refresh asks again on purpose; the old rows stay, and the run records which it used.
    fresh = textadapt("run", "fashion-mnist", *SMALL, "--templates", "targeted", "--refresh")
    assert "30 LLM calls, 0 cached" in fresh.stdout  # 3 classes x 5 questions x 2 samples
    assert query(home, "SELECT count(*), count(*) FILTER (refresh = 1) FROM generations") == [(96, 30)]
    fresh_run = re.search(r"report: \S+/(\S+)\.md", fresh.stdout).group(1)
    assert query(
        home, f"SELECT DISTINCT g.refresh FROM run_generations r JOIN generations g USING (key) WHERE r.run_id = '{fresh_run}'"
    ) == [(1,)]
    again = textadapt("run", "fashion-mnist", *SMALL, "--templates", "targeted")
    assert "0 LLM calls" in again.stdout  # later runs use the newest round

    out = textadapt("sql", "SELECT class_name, template, count(*) FROM generations GROUP BY ALL").stdout
    assert "targeted/look" in out and "T-shirt or top" in out

    # Every example query in the schema docs runs against a real cache (tables and columns exist).
    doc = (REPO / "docs" / "schema.md").read_text()
    queries = [q.strip() for block in re.findall(r"```sql\n(.*?)```", doc, re.S) for q in block.split(";") if q.strip()]
    assert len(queries) >= 9
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        for q in queries:
            s.sql(q.replace("fashion-mnist-...", run_id))  # raises on a table or column the docs invent


def test_published_descriptions_train_without_an_llm(home):
    from test_descriptions import CUPL

    imported = textadapt("descriptions", "import", str(CUPL), "--dataset", "imagenet1k", "--source", "cupl")
    assert "2 classes of imagenet1k have no description" in imported.stderr
    p = textadapt(
        "run",
        "imagenet1k",
        "--templates",
        "",
        "--sources",
        "cupl",
        "--train-only",
        "--max-classes",
        "20",
        "--backbone",
        TINY,
        "--steps",
        "10",
    )
    assert "no LLM generation" in p.stdout
    [(llm, calls, status)] = query(home, "SELECT llm, llm_calls, status FROM runs")
    assert (calls, status) == (0, "completed") and llm.startswith("none")
    report = Path(re.search(r"report: (\S+\.md)", p.stdout).group(1)).read_text()
    assert "| `tap-head:import:cupl` |" in report and "10 full-batch steps" in report and "--train-only" in report
    # a train-only run keeps its classifiers too: it can be exported with no image ever seen
    assert query(home, "SELECT n_classes FROM classifiers WHERE method = 'tap-head:import:cupl'") == [(20,)]
    trained = int(re.search(r"Trained on (\d+) descriptions", report).group(1))
    assert (
        trained
        == query(home, "SELECT count(*) FROM run_generations r JOIN descriptions USING (key) WHERE r.excluded IS NULL")[0][0]
    )
    assert 20 * 30 < trained < 20 * 200


def test_strict_backbone_fails_before_any_llm_call(home):
    if _hub_reachable():
        pytest.skip("the Hugging Face hub is reachable: the weights would download")
    p = textadapt("run", "fashion-mnist", "--backbone", "ViT-B-32:openai", "--max-classes", "2", check=False)
    assert p.returncode == 2
    assert "Ways out" in p.stderr and "ViT-B-32:auto" in p.stderr
    assert p.stderr.count("Ways out") == 1 and "Traceback" not in p.stderr  # the error once, as the CLI's "error:" line
    assert query(home, "SELECT count(*) FROM generations") == [(0,)]
    [(status, error)] = query(home, "SELECT status, error FROM runs")
    assert status == "failed" and "ViT-B-32:openai" in error


# The CLI in a Python that says, as it exits, whether Prefect (its temporary API starts only after) or torch was ever imported.
IMPORTS_PREFECT = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('prefect imported:', 'prefect' in sys.modules, file=sys.stderr))\n"
    "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr))\n"
    "from textadapt.cli import app\n"
    "app(prog_name='textadapt')"
)


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["run", "fashion-mnst"], "unknown dataset 'fashion-mnst'", id="unknown-dataset"),
        pytest.param(
            ["schedule", "fashion-mnst", "--cron", "0 3 * * *"], "unknown dataset 'fashion-mnst'", id="schedule-unknown-dataset"
        ),
        pytest.param(
            ["run", "fashion-mnist", "--backbone", "ViT-B-32"], "backbone spec 'ViT-B-32' is not ARCH:WEIGHTS", id="backbone-spec"
        ),
        pytest.param(["run", "fashion-mnist", "--llm", "gpt-4o"], "unknown LLM spec 'gpt-4o'", id="llm-spec"),
        pytest.param(["run", "fashion-mnist", "--templates", "no-such-set"], "no-such-set", id="missing-template-set"),
        pytest.param(
            ["run", "fashion-mnist", "--methods", "tap-head+mse"],
            "Invalid value for '--methods': unknown loss 'mse'",
            id="methods",
        ),
    ],
)
def test_bad_input_fails_before_prefect_is_imported(home, args, message):
    """One clear message in about a second: neither Prefect (so no temporary API server was started) nor torch imported."""
    p = subprocess.run(
        [sys.executable, "-c", IMPORTS_PREFECT, *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    shown = " ".join(p.stderr.split())  # the console wraps long lines
    assert p.returncode == 2, p.stdout + p.stderr
    assert ("error: " in shown or "Invalid value for" in message) and message in shown and "Traceback" not in shown, shown
    assert "prefect imported: False" in shown and "torch imported: False" in shown
    if args[1] == "fashion-mnst":
        assert "fashion-mnist" in shown.split(message, 1)[1]  # the known datasets are listed


def test_sql_is_read_only_unless_asked(home):
    Store(home / "textadapt.duckdb").close()
    p = textadapt("sql", "DELETE FROM runs", check=False)
    assert p.returncode == 2 and "--write" in p.stderr
    assert textadapt("sql", "--write", "DELETE FROM runs").returncode == 0


def test_a_run_killed_mid_generation_loses_only_what_was_in_flight(home, tmp_path):
    """SIGKILL during generation: every answer finished before the kill is in DuckDB once, the re-run
    asks only for the rest, and the result equals an uninterrupted run's."""
    import signal

    args = [
        "run",
        "fashion-mnist",
        "--backbone",
        TINY,
        "--templates",
        "targeted",
        "--max-classes",
        "2",
        "--samples",
        "3",
        "--max-images",
        "200",
        "--steps",
        "20",
    ]  # 2 classes x 5 questions x 3 samples = 30 generations
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "DEBUG"}  # the progress lines (at DEBUG) say when generation is under way
    proc = subprocess.Popen(
        [CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, stdin=subprocess.DEVNULL
    )
    killed_at = None
    for line in proc.stdout:
        m = re.search(r"generating: (\d+)/30", line)
        if m and 9 <= int(m.group(1)) < 30:
            proc.send_signal(signal.SIGKILL)
            killed_at = int(m.group(1))
            break
    proc.wait(timeout=120)
    proc.stdout.close()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL

    [(stored,)] = query(home, "SELECT count(*) FROM generations")
    assert killed_at <= stored < 30  # what was answered before the kill survived it (DuckDB replays its log)
    rerun = textadapt(*args)
    assert f"{30 - stored} LLM calls, {stored} cached" in rerun.stdout
    assert query(home, "SELECT count(*), count(DISTINCT base_key) FROM generations") == [(30, 30)]
    assert query(home, "SELECT status FROM runs ORDER BY started_at") == [("interrupted",), ("completed",)]

    other = tmp_path / "uninterrupted"
    p = subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TEXTADAPT_HOME": str(other)},
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stderr
    answers = "SELECT key, raw_text FROM generations ORDER BY key"
    results = "SELECT method, top1, mean_per_class FROM results ORDER BY method"
    assert query(home, answers) == query(other, answers)
    assert query(home, results) == query(other, results)


def descendants(pid: int) -> dict[int, str]:
    """The live processes under ``pid`` (from /proc): pid -> command line."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # a zombie has ended: it only waits to be reaped
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            found[p] = (Path("/proc") / str(p) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        todo += children.get(p, [])
    return found


def test_a_run_killed_with_kill_9_leaves_no_process_behind(home):
    """Without a Prefect server, a run starts Prefect's temporary API (a uvicorn server); `kill -9` of the run must not
    leave that server running. The run is held at its LLM server's check (a port that accepts and never answers)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.settimeout(300)
        env = {
            **os.environ,
            "TEXTADAPT_LLM_BASE_URL": f"http://127.0.0.1:{silent.getsockname()[1]}/v1",
            "TEXTADAPT_LLM_TIMEOUT": "600",
        }
        env.pop("PREFECT_API_URL", None)
        run = subprocess.Popen(
            [CLI, "run", "fashion-mnist", "--llm", "openai:silent", "--backbone", TINY, "--max-classes", "2", "--train-only"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            conn, _ = silent.accept()  # the flow runs, against the API, and asks the LLM server for its models
        except TimeoutError:
            run.kill()
            raise AssertionError(f"the run never reached its LLM server: {run.communicate()[1]}") from None
        with conn:
            left = descendants(run.pid)
            assert any("uvicorn" in cmd and "prefect.server" in cmd for cmd in left.values()), left
            os.kill(run.pid, signal.SIGKILL)
            run.wait()
            run.stderr.close()
            deadline = time.monotonic() + 15
            while left and time.monotonic() < deadline:
                time.sleep(0.2)
                left = {p: cmd for p, cmd in left.items() if Path(f"/proc/{p}").exists() and _alive(p)}
    for p in left:  # do not leave them running for the next test
        os.kill(p, signal.SIGKILL)
    assert not left, f"still running after the run was killed: {left}"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
