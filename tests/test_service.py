"""textadapt as a service: scheduled deployments on a real Prefect server (`prefect server start`,
started by a fixture), served from this machine; the Dask task runner on a local cluster against
the default runner; the one-writer rule; prefect.yaml."""

import os
import pickle
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, free_port

from textadapt import TextadaptError
from textadapt.config import RunOptions
from textadapt.store import Store

CLI = str(Path(sys.executable).parent / "textadapt")
SUBSET = ["--backbone", TINY, "--templates", "targeted", "--max-classes", "2", "--max-images", "20", "--samples", "1",
          "--steps", "10", "--batch-size", "8"]  # 2 classes x 5 questions x 1 sample = 10 generations


def textadapt(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([CLI, *args], capture_output=True, text=True, env=env or os.environ.copy(), timeout=900,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"textadapt {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def query(db: Path, sql: str) -> list[tuple]:
    with Store(db, read_only=True) as s:
        return s.sql(sql)[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 with its own PREFECT_HOME; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server did not answer {api}/health within 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def prefect_api(prefect_server, monkeypatch):
    """PREFECT_API_URL set for subprocesses and for this process's Prefect client."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server


def test_schedule_registers_a_cron_deployment_that_serve_runs(prefect_api, llama_server, home, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.deployments import run_deployment
    from test_llm_http import CountingProxy

    # The schedule, with run options as for `textadapt run`, read back from the server.
    out = textadapt("schedule", "fashion-mnist", "--cron", "0 3 * * *", *SUBSET, "--llm", "openai:smollm2").stdout
    assert "textadapt-adapt/fashion-mnist" in out
    with get_client(sync_client=True) as client:
        first = client.read_deployment_by_name("textadapt-adapt/fashion-mnist")
        assert [s.schedule.cron for s in first.schedules] == ["0 3 * * *"]
        options = RunOptions.model_validate(first.parameters["options"])
        assert (options.max_classes, options.samples, options.template_sets, options.llm) == (2, 1, ["targeted"], "openai:smollm2")
    # Scheduling again updates the same deployment: one schedule, the new cron.
    textadapt("schedule", "fashion-mnist", "--cron", "30 4 * * 1", "--timezone", "Europe/Paris", *SUBSET, "--llm", "openai:smollm2")
    with get_client(sync_client=True) as client:
        again = client.read_deployment_by_name("textadapt-adapt/fashion-mnist")
        assert again.id == first.id
        assert [(s.schedule.cron, s.schedule.timezone) for s in again.schedules] == [("30 4 * * 1", "Europe/Paris")]
        # Two LLM requests at once over every flow run of this server.
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="textadapt-llm", limit=2))
    bad = textadapt("schedule", "fashion-mnist", "--cron", "61 3 * * *", check=False)
    assert bad.returncode == 2 and "--cron '61 3 * * *'" in bad.stderr

    # `textadapt serve` runs a triggered run of the deployment to completion.
    with CountingProxy(llama_server) as proxy:
        env = {**os.environ, "TEXTADAPT_LLM_BASE_URL": proxy.url, "TEXTADAPT_LLM_CONCURRENCY": "4",
               "PREFECT_LOGGING_LEVEL": "INFO"}
        log = home / "serve.log"
        home.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as f:
            server = subprocess.Popen([CLI, "serve"], stdout=f, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        try:
            run = run_deployment("textadapt-adapt/fashion-mnist", timeout=0)
            deadline = time.monotonic() + 600
            with get_client(sync_client=True) as client:
                while not (state := client.read_flow_run(run.id).state).is_final():
                    assert server.poll() is None, log.read_text()[-3000:]
                    assert time.monotonic() < deadline, f"flow run still {state.name}\n{log.read_text()[-3000:]}"
                    time.sleep(2)
                limit = client.read_global_concurrency_limit_by_name("textadapt-llm")
        finally:
            server.terminate()
            server.wait(timeout=60)
    assert state.is_completed(), f"{state.name}: {state.message}\n{log.read_text()[-5000:]}"
    assert proxy.requests == 10 and 1 <= proxy.max_in_flight <= 2  # the limit's 2 slots, not the run's 4
    assert limit.active_slots == 0  # every slot given back

    # `textadapt runs` lists it from the cache, with its gain over zero-shot.
    [(run_id, status)] = query(home / "textadapt.duckdb", "SELECT run_id, status FROM runs")
    assert status == "completed"
    monkeypatch.setenv("COLUMNS", "200")
    listed = textadapt("runs").stdout
    row = next(line for line in listed.splitlines() if run_id in line)
    assert "completed" in row and "tap-head:targeted" in row and re.search(r"[+-]\d+\.\d\*", row)
    assert "untrained backbone" in listed


def test_dask_runner_gives_the_same_generations_and_metrics(llama_server, tmp_path):
    """The same run on threads and on a local Dask cluster (2 worker processes, 1 thread each):
    the same rows in DuckDB, the same metrics; generation and embedding ran in the workers, and only
    the flow's process wrote the cache."""
    # llama_cpp.server reuses the KV cache of the previous prompt's prefix, which moves the logits a
    # little: sampled answers (temperature > 0) then depend on the order requests arrive in, which
    # differs between runners. Greedy answers do not (temperature 0).
    args = ["run", "fashion-mnist", *SUBSET, "--llm", "openai:smollm2", "--temperature", "0"]
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the temporary local API
    base.update(TEXTADAPT_LLM_BASE_URL=llama_server, PREFECT_LOGGING_LEVEL="INFO")
    homes = {"threads": tmp_path / "threads", "dask": tmp_path / "dask"}
    textadapt(*args, env={**base, "TEXTADAPT_HOME": str(homes["threads"])})
    dask = textadapt(*args, "--task-runner", "dask", env={**base, "TEXTADAPT_HOME": str(homes["dask"]),
                                                          "TEXTADAPT_DASK_WORKERS": "2", "TEXTADAPT_DASK_THREADS_PER_WORKER": "1"})
    logs = dask.stdout + dask.stderr
    assert re.search(r"Dask: a local cluster, 2 workers, 2 threads", logs), logs[-3000:]
    flow_process = re.search(r"the cache is written by this process \((\S+)\)", logs).group(1)
    for stage in ("generation", "text embedding", "image embedding"):
        m = re.search(rf"{stage} batches ran in (\d+) processes: (.*)", logs)
        assert m, f"no {stage} line in\n{logs[-3000:]}"
        assert flow_process not in m.group(2)
    assert re.search(r"generation batches ran in 2 processes", logs)
    # The workers reached the run's temporary API: none started its own.
    assert logs.count("Starting temporary server") == 1

    same = [
        "SELECT key, dataset, class_name, template, model, prompt, params, raw_text, description, rejected FROM generations ORDER BY key",
        "SELECT backbone, text_hash, text, embedding FROM text_embeddings ORDER BY text_hash",
        "SELECT backbone, image_hash, embedding FROM image_embeddings ORDER BY image_hash",
        "SELECT method, kind, top1, mean_per_class, n_images, n_texts, losses FROM results ORDER BY method",
        "SELECT method, class_index, accuracy, delta FROM class_results ORDER BY method, class_index",
        "SELECT status, llm_calls, cached_generations, text_encoder_calls FROM runs",
    ]
    for sql in same:
        threads, on_dask = (query(homes[r] / "textadapt.duckdb", sql) for r in ("threads", "dask"))
        assert threads and threads == on_dask, sql
    assert query(homes["dask"] / "textadapt.duckdb", "SELECT status, llm_calls FROM runs") == [("completed", 10)]


def test_the_cache_never_travels_to_another_process(home):
    """One writer: a Store cannot be sent to a worker; a task there must return rows instead."""
    with Store(home / "textadapt.duckdb") as store:
        with pytest.raises(TextadaptError, match="one process only"):
            pickle.dumps(store)


def test_prefect_yaml_declares_valid_scheduled_deployments():
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)  # prefect deploy's own model of the file
    assert model.deployments
    for d, raw_d in zip(model.deployments, raw["deployments"]):
        assert d.work_pool and d.work_pool.name == "textadapt", d.name
        options = d.parameters["options"]
        assert set(options) <= set(RunOptions.model_fields), d.name  # every option is a real run option
        RunOptions.model_validate(options)
        for s in raw_d["schedules"]:
            RawScheduleConfig.model_validate(s)
            CronSchedule(cron=s["cron"], timezone=s.get("timezone"))
        path, _, name = d.entrypoint.partition(":")
        flow = load_flow_from_entrypoint(f"{REPO / path}:{name}")
        assert flow.name == "textadapt-adapt"
