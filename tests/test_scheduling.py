"""Scheduled runs as users run them, on a real `prefect server` (tests/conftest.py): `textadapt schedule` with a
cron every minute plus `textadapt serve`, and prefect.yaml's deployment on a real process worker. Each test waits
for a run that Prefect's scheduler made (not one triggered by hand) to complete, and finds it in the cache.
Then what keeps deployments apart: the checks before anything is created, whose deployment is whose, what
`serve` serves, one flow run of a deployment at a time, and a run's timeout.

Every run is a few seconds of work: the tiny random backbone, descriptions imported into the cache (no LLM),
2 classes, 20 images. A wait for a scheduled run is bounded by the next minute boundary (the cron), the
scheduler's loop for new deployments (5 s), the runner's or worker's poll (10 s) and the run itself."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY
from processes import Background, wait_for

from textadapt.store import Store

CLI = str(Path(sys.executable).parent / "textadapt")
PREFECT = str(Path(sys.executable).parent / "prefect")
SMALL = ["--backbone", TINY, "--templates", "", "--sources", "shapes", "--max-classes", "2", "--max-images", "20",
         "--samples", "1", "--steps", "5", "--seeds", "1"]
SMALL_PARAMETERS = {"backbone": TINY, "template_sets": [], "sources": ["shapes"], "max_classes": 2, "max_images": 20,
                    "samples": 1, "steps": 5, "seeds": 1}  # the same as a flow's parameters (prefect.yaml)
SCHEDULED_RUN_SECONDS = 240  # a minute boundary, the scheduler's and the poller's loops, and a run of seconds (on 2 busy cores)


def cli(*args: str, check: bool = True, cwd: Path | None = None, program: str = CLI) -> subprocess.CompletedProcess:
    p = subprocess.run([program, *args], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{Path(program).name} {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


@pytest.fixture
def service(prefect_server, home, monkeypatch, tmp_path):
    """PREFECT_API_URL set (for subprocesses and this process's client), two classes' descriptions imported into the cache
    as source `shapes`; afterwards every deployment is deleted, so that no schedule fires into the next test."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    described = {"T-shirt or top": ["a short-sleeved top with a round neck", "a plain cotton t-shirt"],
                 "trouser": ["two long trouser legs side by side", "a pair of long pants with a waistband"]}
    (tmp_path / "shapes.json").write_text(json.dumps(described))
    cli("descriptions", "import", str(tmp_path / "shapes.json"), "--dataset", "fashion-mnist", "--source", "shapes")
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        try:
            yield prefect_server
        finally:
            with client() as c:
                for d in c.read_deployments():
                    c.delete_deployment(d.id)


def runs_of(deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with client() as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def finished_scheduled_run(deployment_id):
    """The first flow run of the deployment that Prefect's scheduler made and that has finished, else None."""
    done = [r for r in runs_of(deployment_id) if r.auto_scheduled and r.state and r.state.is_final()]
    return min(done, key=lambda r: r.expected_start_time) if done else None


def cache_rows(home: Path, sql: str) -> list[tuple]:
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        return s.sql(sql)[1]


def assert_made_by_the_scheduler(run) -> None:
    """The run came from the deployment's cron, not from a person: the scheduler's key, a start on a minute boundary."""
    with client() as c:
        states = c.read_flow_run_states(run.id)
    assert run.auto_scheduled and run.idempotency_key.startswith("scheduled "), run
    assert states[0].name == "Scheduled" and states[0].state_details.scheduled_time.second == 0, states[0]
    assert [s.name for s in states][-2:] == ["Running", "Completed"], [s.name for s in states]


def test_a_cron_schedule_fires_and_serve_runs_it(service, home, tmp_path):
    t0 = time.monotonic()
    out = cli("schedule", "fashion-mnist", "--cron", "* * * * *", *SMALL).stdout
    assert "textadapt-adapt/fashion-mnist" in out and "'* * * * *'" in out
    with client() as c:
        deployment = c.read_deployment_by_name("textadapt-adapt/fashion-mnist")
    with Background("textadapt serve", [CLI, "serve"], tmp_path) as serve:
        run = wait_for("a scheduled run of textadapt-adapt/fashion-mnist to finish", lambda: finished_scheduled_run(deployment.id),
                       SCHEDULED_RUN_SECONDS, serve)
        assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{serve.log()}"
    print(f"schedule to a completed scheduled run: {time.monotonic() - t0:.0f} s")
    assert_made_by_the_scheduler(run)
    # The run is in the cache under its flow run's name, with its flow run's id.
    assert (run.name, "completed", str(run.id)) in cache_rows(home, "SELECT run_id, status, flow_run_id FROM runs")
    assert cache_rows(home, f"SELECT count(*) FROM results WHERE run_id = '{run.name}'")[0][0] > 0


def test_a_prefect_yaml_deployment_runs_on_a_process_worker(service, home, tmp_path):
    """The shipped prefect.yaml's first deployment, as `prefect deploy` registers it, with its cron every minute and a
    small run; its pool made as prefect.yaml says (a process pool, one flow run at a time); a real worker runs it."""
    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployment = shipped["deployments"][0]
    deployment["schedules"] = [{"cron": "* * * * *", "timezone": "UTC"}]
    deployment["parameters"] = {**deployment["parameters"], **SMALL_PARAMETERS}
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump({**shipped, "deployments": [deployment]}))
    pool = deployment["work_pool"]["name"]
    t0 = time.monotonic()
    cli("work-pool", "create", pool, "--type", "process", program=PREFECT)
    cli("work-pool", "set-concurrency-limit", pool, "1", program=PREFECT)
    cli("--no-prompt", "deploy", "--all", cwd=tmp_path, program=PREFECT)
    with client() as c:
        registered = c.read_deployment_by_name(f"textadapt-adapt/{deployment['name']}")
        assert c.read_work_pool(pool).concurrency_limit == 1
    assert registered.work_pool_name == pool and registered.global_concurrency_limit.limit == 1
    with Background("prefect worker", [PREFECT, "worker", "start", "--pool", pool], tmp_path, cwd=tmp_path) as worker:
        run = wait_for(f"a scheduled run of {deployment['name']} to finish", lambda: finished_scheduled_run(registered.id),
                       SCHEDULED_RUN_SECONDS, worker)
        assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{worker.log()}"
    print(f"prefect deploy to a completed scheduled run on the worker: {time.monotonic() - t0:.0f} s")
    assert_made_by_the_scheduler(run)
    assert run.work_pool_name == pool
    assert (run.name, "completed", str(run.id)) in cache_rows(home, "SELECT run_id, status, flow_run_id FROM runs")
