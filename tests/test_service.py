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

import numpy as np
import pytest
import yaml
from conftest import REPO, TINY
from processes import Background, wait_for

from textadapt import TextadaptError
from textadapt.config import RunOptions
from textadapt.store import Store

CLI = str(Path(sys.executable).parent / "textadapt")
SUBSET = [
    "--backbone",
    TINY,
    "--templates",
    "targeted",
    "--max-classes",
    "2",
    "--max-images",
    "20",
    "--samples",
    "1",
    "--steps",
    "10",
    "--batch-size",
    "8",
]  # 2 classes x 5 questions x 1 sample = 10 generations


def textadapt(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [CLI, *args], capture_output=True, text=True, env=env or os.environ.copy(), timeout=900, stdin=subprocess.DEVNULL
    )
    if check and p.returncode != 0:
        raise AssertionError(f"textadapt {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def query(db: Path, sql: str) -> list[tuple]:
    with Store(db, read_only=True) as s:
        return s.sql(sql)[1]


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
    from prefect.concurrency.sync import concurrency
    from prefect.deployments import run_deployment
    from test_llm_http import CountingProxy

    # The schedule, with run options as for `textadapt run`, read back from the server.
    out = textadapt("schedule", "fashion-mnist", "--cron", "0 3 * * *", *SUBSET, "--llm", "openai:smollm2").stdout
    assert "textadapt-adapt/fashion-mnist" in out
    with get_client(sync_client=True) as client:
        first = client.read_deployment_by_name("textadapt-adapt/fashion-mnist")
        assert [s.schedule.cron for s in first.schedules] == ["0 3 * * *"]
        options = RunOptions.parse(first.parameters)  # one parameter per run option given
        assert (options.max_classes, options.samples, options.template_sets, options.llm) == (
            2,
            1,
            ["targeted"],
            "openai:smollm2",
        )
        assert "seeds" not in first.parameters  # an option left at its default is not pinned in the deployment
    # Scheduling again updates the same deployment: one schedule, the new cron.
    textadapt(
        "schedule", "fashion-mnist", "--cron", "30 4 * * 1", "--timezone", "Europe/Paris", *SUBSET, "--llm", "openai:smollm2"
    )
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
        env = {
            **os.environ,
            "TEXTADAPT_LLM_BASE_URL": proxy.url,
            "TEXTADAPT_LLM_CONCURRENCY": "4",
            "PREFECT_LOGGING_LEVEL": "DEBUG",
        }  # the progress lines ("generating: 0/10") are at DEBUG
        log = home / "serve.log"
        home.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as f:
            server = subprocess.Popen([CLI, "serve"], stdout=f, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600
            # Something else holds both slots of the limit: the run gets as far as generation, and waits.
            with concurrency("textadapt-llm", occupy=2, strict=True):
                # one option overridden for this run: the deployment's others stay
                run = run_deployment("textadapt-adapt/fashion-mnist", parameters={"seeds": 1}, timeout=0)
                while "generating: 0/10" not in log.read_text():
                    assert server.poll() is None, log.read_text()[-3000:]
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(1)
                time.sleep(5)
                assert proxy.requests == 1  # the backend's check (GET /models), which holds no slot; no generation
            with get_client(sync_client=True) as client:
                while not (state := client.read_flow_run(run.id).state).is_final():
                    assert server.poll() is None, log.read_text()[-3000:]
                    assert time.monotonic() < deadline, f"flow run still {state.name}\n{log.read_text()[-3000:]}"
                    time.sleep(2)
                limit = client.read_global_concurrency_limit_by_name("textadapt-llm")
                flow_run = client.read_flow_run(run.id)
        finally:
            server.terminate()
            server.wait(timeout=60)
    assert state.is_completed(), f"{state.name}: {state.message}\n{log.read_text()[-5000:]}"
    assert proxy.requests == 1 + 10 and 1 <= proxy.max_in_flight <= 2  # the limit's 2 slots, not the run's 4
    assert limit.active_slots == 0  # every slot given back

    # `textadapt runs` lists it from the cache, with its gain over zero-shot.
    [(run_id, status, options, flow_run_id)] = query(
        home / "textadapt.duckdb", "SELECT run_id, status, options, flow_run_id FROM runs"
    )
    assert status == "completed"
    options = RunOptions.model_validate_json(options)
    assert (options.seeds, options.backbone, options.max_classes, options.llm) == (1, TINY, 2, "openai:smollm2")
    assert (flow_run.name, str(flow_run.id)) == (run_id, flow_run_id)  # the flow run is named after the run, which records its id
    monkeypatch.setenv("COLUMNS", "200")
    listed = textadapt("runs").stdout
    row = next(line for line in listed.splitlines() if run_id in line)
    assert "completed" in row and "tap-head:targeted" in row and re.search(r"[+-]\d+\.\d\*", row)
    assert "untrained backbone" in listed


def test_a_partial_override_keeps_the_deployments_other_parameters(prefect_api):
    """On a real Prefect server: a run of a deployment that overrides one run option keeps the deployment's
    others (the backbone above all), and the server shows each option as a parameter of its own."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from textadapt.flows.adapt import adapt

    textadapt(
        "schedule",
        "fashion-mnist",
        "--cron",
        "0 3 * * *",
        "--name",
        "override",
        "--backbone",
        TINY,
        "--max-classes",
        "2",
        "--prior",
        "blank-image",
    )
    run = run_deployment("textadapt-adapt/override", parameters={"max_classes": 3}, timeout=0)  # as the UI's "custom run"
    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(run.id).parameters
        schema = client.read_deployment_by_name("textadapt-adapt/override").parameter_openapi_schema
    assert parameters == {"dataset": "fashion-mnist", "backbone": TINY, "max_classes": 3, "prior": "blank-image"}
    # what the flow makes of them when the run starts: the override, the deployment's options, the defaults
    options = RunOptions.parse(adapt.validate_parameters(parameters))
    assert (options.backbone, options.max_classes, options.prior, options.samples) == (TINY, 3, "blank-image", 5)
    # the UI's form: every run option, with its type, default and description
    props = schema["properties"]
    assert list(props) == list(RunOptions.model_fields) and schema["required"] == ["dataset"]
    for name, field in RunOptions.model_fields.items():
        assert props[name]["description"] == field.description, name
    assert props["samples"]["default"] == 5 and props["samples"]["minimum"] == 1
    assert props["prior"]["enum"] == ["empty-text", "blank-image", "mean-image"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dask_runner_gives_the_same_generations_and_metrics(llama_server, prefect_server, tmp_path):
    """The same run on threads, on a local Dask cluster (2 worker processes, 1 thread each) and on a real cluster
    (`dask scheduler` and two `dask worker` processes on 127.0.0.1, TEXTADAPT_DASK_ADDRESS): the same rows in DuckDB,
    the same metrics; generation and embedding ran in the workers, and only the flow's process wrote the cache."""
    # llama_cpp.server reuses the KV cache of the previous prompt's prefix, which moves the logits a
    # little: sampled answers (temperature > 0) then depend on the order requests arrive in, which
    # differs between runners. Greedy answers do not (temperature 0).
    args = ["run", "fashion-mnist", *SUBSET, "--llm", "openai:smollm2", "--temperature", "0"]
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base.update(
        TEXTADAPT_LLM_BASE_URL=llama_server, PREFECT_LOGGING_LEVEL="INFO", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120"
    )  # 2 busy cores: the default 20 s is short
    homes = {side: tmp_path / side for side in ("threads", "local", "cluster")}
    textadapt(*args, env={**base, "TEXTADAPT_HOME": str(homes["threads"]), "PREFECT_API_URL": prefect_server})
    logs = {}
    # A local cluster, which the flow starts; the run's own temporary Prefect API (no PREFECT_API_URL).
    local = {
        **base,
        "TEXTADAPT_HOME": str(homes["local"]),
        "TEXTADAPT_DASK_WORKERS": "2",
        "TEXTADAPT_DASK_THREADS_PER_WORKER": "1",
    }
    p = textadapt(*args, "--task-runner", "dask", env=local)
    logs["local"] = p.stdout + p.stderr
    assert re.search(r"Dask: a local cluster, 2 workers, 2 threads", logs["local"]), logs["local"][-3000:]
    # A cluster of its own processes, as a user runs one beside a Prefect server; its workers talk to that server.
    address = f"tcp://127.0.0.1:{_free_port()}"
    dask = str(Path(sys.executable).parent / "dask")
    worker_env = {**base, "PREFECT_API_URL": prefect_server}
    with (
        Background(
            "dask scheduler",
            [dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--dashboard-address", ":0"],
            tmp_path,
            env=worker_env,
        ) as scheduler,
        Background(
            "dask worker",
            [
                dask,
                "worker",
                address,
                "--nworkers",
                "2",
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--dashboard-address",
                ":0",
                "--local-directory",
                str(tmp_path / "dask-worker"),
            ],
            tmp_path,
            env=worker_env,
        ) as workers,
    ):
        wait_for("two dask workers to join", lambda: workers.log().count("Registered to") >= 2 or None, 120, scheduler, workers)
        cluster = {
            **base,
            "TEXTADAPT_HOME": str(homes["cluster"]),
            "TEXTADAPT_DASK_ADDRESS": address,
            "PREFECT_API_URL": prefect_server,
        }
        p = textadapt(*args, "--task-runner", "dask", env=cluster)
        logs["cluster"] = p.stdout + p.stderr
        assert f"Dask: {address}, 2 workers, 2 threads" in logs["cluster"], logs["cluster"][-3000:]
        assert scheduler.alive() and workers.alive()
    for side, text in logs.items():
        flow_process = re.search(r"the cache is written by this process \((\S+)\)", text).group(1)
        for stage in ("generation", "text embedding", "image embedding"):
            m = re.search(rf"{stage} batches ran in (\d+) processes: (.*)", text)
            assert m, f"{side}: no {stage} line in\n{text[-3000:]}"
            assert flow_process not in m.group(2), side
        assert re.search(r"generation batches ran in 2 processes", text), side
        # The workers reached the run's Prefect API: none started its own.
        assert "Starting temporary server" not in text, side

    same = [
        "SELECT key, dataset, class_name, template, model, prompt, params, raw_text, description, rejected FROM generations ORDER BY key",
        "SELECT method, kind, top1, mean_per_class, n_images, n_texts FROM results ORDER BY method",
        "SELECT method, class_index, accuracy, delta FROM class_results ORDER BY method, class_index",
        "SELECT status, llm_calls, cached_generations, text_encoder_calls FROM runs",
    ]
    # Embeddings and training losses agree to float precision: torch on a 1-thread worker sums in
    # another order than in the flow's 2-thread process.
    close = [
        "SELECT text_hash, text, embedding FROM text_embeddings ORDER BY text_hash",
        "SELECT image_hash, embedding FROM image_embeddings ORDER BY image_hash",
        "SELECT method, losses FROM results WHERE losses IS NOT NULL ORDER BY method",
    ]
    for side in ("local", "cluster"):
        for sql in same:
            threads, on_dask = (query(homes[r] / "textadapt.duckdb", sql) for r in ("threads", side))
            assert threads and threads == on_dask, (side, sql)
        for sql in close:
            threads, on_dask = (query(homes[r] / "textadapt.duckdb", sql) for r in ("threads", side))
            assert threads and [r[:-1] for r in threads] == [r[:-1] for r in on_dask], (side, sql)
            assert np.allclose([r[-1] for r in threads], [r[-1] for r in on_dask], rtol=1e-4, atol=1e-5), (side, sql)
        assert query(homes[side] / "textadapt.duckdb", "SELECT status, llm_calls FROM runs") == [("completed", 10)]


def test_the_cache_never_travels_to_another_process(home):
    """One writer: a Store cannot be sent to a worker; a task there must return rows instead."""
    with Store(home / "textadapt.duckdb") as store:
        with pytest.raises(TextadaptError, match="one process only"):
            pickle.dumps(store)


def test_prefect_yaml_declares_valid_scheduled_deployments(monkeypatch, tmp_path):
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)  # prefect deploy's own model of the file
    assert model.deployments
    monkeypatch.chdir(tmp_path)  # a module path: the flow loads from the installed package, wherever the worker runs
    for d, raw_d in zip(model.deployments, raw["deployments"]):
        # the pool the worker's environment names (`prefect deploy` fills it in; tests/test_compose.py runs it)
        assert d.work_pool and d.work_pool.name == "{{ $PREFECT_DEFAULT_WORK_POOL_NAME }}", d.name
        assert set(d.parameters) <= set(RunOptions.model_fields), d.name  # every parameter is a real run option
        RunOptions.parse(d.parameters)
        for s in raw_d["schedules"]:
            RawScheduleConfig.model_validate(s)
            CronSchedule(cron=s["cron"], timezone=s.get("timezone"))
        flow = load_flow_from_entrypoint(d.entrypoint)  # as `prefect deploy` and the worker load it
        assert flow.name == "textadapt-adapt"
        flow.validate_parameters(d.parameters)  # what the worker does with them before the run


class FailingFirst:
    """An HTTP proxy in front of an OpenAI-compatible server that answers 503 to the first ``fail``
    POSTs and forwards everything else; counts what it forwarded."""

    def __init__(self, upstream: str, fail: int):
        self.upstream, self.fail, self.failed, self.forwarded = upstream.rstrip("/"), fail, 0, 0

    def __enter__(self):
        import http.server
        import threading

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if proxy.failed < proxy.fail:
                    proxy.failed += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                proxy.forwarded += 1
                path = self.path.removeprefix("/v1")
                req = urllib.request.Request(proxy.upstream + path, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as r:
                    data = r.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_failed_batch_is_retried_and_cached_answers_are_not_asked_again(llama_server, prefect_api, fmnist, home):
    from prefect import flow

    from textadapt import pipeline
    from textadapt.config import Settings
    from textadapt.flows.workers import Workers
    from textadapt.llm import Sampling, make_backend
    from textadapt.prompts import list_templates

    with FailingFirst(llama_server, fail=2) as proxy:
        # No client-side retry: the 503s reach the task, and Prefect retries the batch.
        settings = Settings(llm_base_url=proxy.url, llm_max_retries=0, llm_concurrency=1, llm_n_per_request=False)
        backend = make_backend("openai:smollm2", settings)
        spec = fmnist.model_copy(update={"classes": fmnist.classes[:2]})
        templates = list_templates(settings.prompts_dir, ["targeted"])[:2]
        plan = pipeline.plan_generations(spec, templates, backend.identity, Sampling(temperature=0, max_tokens=20), 2)
        seen = []

        @flow
        def generate(first_n: int):
            with Workers.open("threads", settings) as workers:
                return pipeline.generate(
                    plan[:first_n],
                    backend,
                    store,
                    spec,
                    lambda done, total: seen.append((done, total)),
                    runner=workers,
                    llm_spec="openai:smollm2",
                    settings=settings,
                )

        with Store(home / "textadapt.duckdb") as store:
            first = generate(4)  # 2 batches (class 0 x 2 templates x 2 samples); the first 2 requests fail
            assert (first.made, first.cached) == (4, 0)
            assert proxy.failed == 2 and proxy.forwarded == 4  # retried, each answer asked for once it got through
            again = generate(len(plan))  # the 4 cached generations are not asked for again
            assert (again.made, again.cached) == (4, 4) and proxy.forwarded == 8
            assert store.sql("SELECT count(*), count(DISTINCT key) FROM generations")[1] == [(8, 8)]
    assert seen[-1] == (4, 4)  # progress counts what each run asked for


def test_schedule_without_a_prefect_server_says_how_to_get_one(monkeypatch):
    from typer.testing import CliRunner

    from textadapt.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for args in (["schedule", "fashion-mnist", "--cron", "0 3 * * *"], ["serve"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "PREFECT_API_URL" in result.output and "prefect server start" in result.output, (
            result.output
        )
