"""Scheduled runs as users run them, on a real `prefect server` (tests/conftest.py): `textadapt schedule` with a
cron every minute plus `textadapt serve`, and prefect.yaml's deployment on a real process worker. Each test waits
for a run that Prefect's scheduler made (not one triggered by hand) to complete, and finds it in the cache.
Then what keeps deployments apart: the checks before anything is created, whose deployment is whose, what
`serve` serves, one flow run of a deployment at a time, and a run's timeout.

Every run is a few seconds of work: the tiny random backbone, descriptions imported into the cache (no LLM),
2 classes, 20 images. A wait for a scheduled run is bounded by the next minute boundary (the cron), the
scheduler's loop for new deployments (5 s), the runner's or worker's poll (10 s) and the run itself."""

import json
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
SMALL = [
    "--backbone",
    TINY,
    "--templates",
    "",
    "--sources",
    "shapes",
    "--max-classes",
    "2",
    "--max-images",
    "20",
    "--samples",
    "1",
    "--steps",
    "5",
    "--seeds",
    "1",
]
SMALL_PARAMETERS = {
    "backbone": TINY,
    "template_sets": [],
    "sources": ["shapes"],
    "max_classes": 2,
    "max_images": 20,
    "samples": 1,
    "steps": 5,
    "seeds": 1,
}  # the same as a flow's parameters (prefect.yaml)
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
    described = {
        "T-shirt or top": ["a short-sleeved top with a round neck", "a plain cotton t-shirt"],
        "trouser": ["two long trouser legs side by side", "a pair of long pants with a waistband"],
    }
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
        run = wait_for(
            "a scheduled run of textadapt-adapt/fashion-mnist to finish",
            lambda: finished_scheduled_run(deployment.id),
            SCHEDULED_RUN_SECONDS,
            serve,
        )
        assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{serve.log()}"
    print(f"schedule to a completed scheduled run: {time.monotonic() - t0:.0f} s")
    assert_made_by_the_scheduler(run)
    # The run is in the cache under its flow run's name, with its flow run's id.
    assert (run.name, "completed", str(run.id)) in cache_rows(home, "SELECT run_id, status, flow_run_id FROM runs")
    assert cache_rows(home, f"SELECT count(*) FROM results WHERE run_id = '{run.name}'")[0][0] > 0


def test_a_prefect_yaml_deployment_runs_on_a_process_worker(service, home, tmp_path, monkeypatch):
    """The shipped prefect.yaml's first deployment, as `prefect deploy` registers it, with its cron every minute and a
    small run; its pool made as prefect.yaml says (a process pool, one flow run at a time); a real worker runs it."""
    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployment = shipped["deployments"][0]
    deployment["schedules"] = [{"cron": "* * * * *", "timezone": "UTC"}]
    deployment["parameters"] = {**deployment["parameters"], **SMALL_PARAMETERS}
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump({**shipped, "deployments": [deployment]}))
    assert deployment["work_pool"]["name"] == "{{ $PREFECT_DEFAULT_WORK_POOL_NAME }}"  # prefect deploy fills it in
    pool = "textadapt-test-pool"
    monkeypatch.setenv("PREFECT_DEFAULT_WORK_POOL_NAME", pool)
    t0 = time.monotonic()
    cli("work-pool", "create", pool, "--type", "process", program=PREFECT)
    cli("work-pool", "set-concurrency-limit", pool, "1", program=PREFECT)
    cli("--no-prompt", "deploy", "--all", cwd=tmp_path, program=PREFECT)
    with client() as c:
        registered = c.read_deployment_by_name(f"textadapt-adapt/{deployment['name']}")
        assert c.read_work_pool(pool).concurrency_limit == 1
    assert registered.work_pool_name == pool and registered.global_concurrency_limit.limit == 1
    with Background("prefect worker", [PREFECT, "worker", "start", "--pool", pool], tmp_path, cwd=tmp_path) as worker:
        run = wait_for(
            f"a scheduled run of {deployment['name']} to finish",
            lambda: finished_scheduled_run(registered.id),
            SCHEDULED_RUN_SECONDS,
            worker,
        )
        assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{worker.log()}"
    print(f"prefect deploy to a completed scheduled run on the worker: {time.monotonic() - t0:.0f} s")
    assert_made_by_the_scheduler(run)
    assert run.work_pool_name == pool
    assert (run.name, "completed", str(run.id)) in cache_rows(home, "SELECT run_id, status, flow_run_id FROM runs")


def test_schedule_checks_the_cron_the_options_and_the_dataset_before_creating_anything(service, home, tmp_path):
    from PIL import Image

    # A dataset of the user's own, made with `datasets new` and not finished: its wording still to fill in, a truncated PNG.
    for name in ("cats", "dogs"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 100, 50)).save(tmp_path / "photos" / name / "a.png")
    broken = tmp_path / "photos" / "dogs" / "b.png"
    broken.write_bytes((tmp_path / "photos" / "dogs" / "a.png").read_bytes()[:60])
    cli("datasets", "new", "pets", "--from-folder", str(tmp_path / "photos"))

    cron = ["--cron", "0 3 * * *"]
    refused = {  # arguments -> what the one error must name
        ("fashion-mnist", "--cron", "61 3 * * *"): "--cron '61 3 * * *' is not a cron schedule: five fields",
        ("fashion-mnist", "--cron", "every night"): "--cron 'every night' is not a cron schedule",
        ("fashion-mnist", *cron, "--timezone", "Mars/Olympus"): "--timezone 'Mars/Olympus' is not a time zone",
        ("no-such-dataset", *cron): "no-such-dataset",
        ("fashion-mnist", *cron, "--samples", "0"): "--samples",
        ("fashion-mnist", *cron, "--methods", "tap-hed"): "tap-hed",
        ("fashion-mnist", *cron, "--templates", "no-such-set"): "no-such-set",
        ("fashion-mnist", *cron, "--llm", f"llama-cpp:{tmp_path}/missing.gguf"): f"{tmp_path}/missing.gguf",
        ("pets", *cron, "--backbone", TINY): str(broken),
    }
    for args, named in refused.items():
        p = cli("schedule", *args, check=False)
        assert p.returncode == 2 and named in p.stderr, (args, p.stdout, p.stderr)
        assert not any(s in p.stderr for s in ("Traceback", "pydantic", "https://")), (args, p.stderr)
        if "--cron" in named or "--timezone" in named:
            assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # one line naming the value
    assert "FILL IN" in cli("schedule", "pets", *cron, check=False).stderr  # the spec's placeholders, in the same error
    with client() as c:
        assert c.read_deployments() == []  # nothing was created


def deploy_yaml(folder: Path, deployments: list[dict]) -> None:
    """`prefect deploy --all` of a prefect.yaml holding ``deployments`` (the shipped file's header), from ``folder``."""
    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    # the pool as `prefect deploy` fills it in from PREFECT_DEFAULT_WORK_POOL_NAME (tests/test_compose.py deploys the template)
    pool = {"{{ $PREFECT_DEFAULT_WORK_POOL_NAME }}": "textadapt"}
    deployments = [
        d | {"work_pool": {**d["work_pool"], "name": pool.get(d["work_pool"]["name"], d["work_pool"]["name"])}}
        for d in deployments
    ]
    (folder / "prefect.yaml").write_text(yaml.safe_dump({**shipped, "deployments": deployments}))
    with client() as c:
        pools = {p.name for p in c.read_work_pools()}
    for pool in {d["work_pool"]["name"] for d in deployments} - pools:
        cli("work-pool", "create", pool, "--type", "process", program=PREFECT)
    cli("--no-prompt", "deploy", "--all", cwd=folder, program=PREFECT)


def shape(d) -> dict:
    """What a deployment is, as the server has it."""
    return dict(
        id=d.id,
        parameters=d.parameters,
        tags=sorted(d.tags),
        pool=d.work_pool_name,
        updated=d.updated,
        schedules=[(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules],
        limit=d.global_concurrency_limit.limit if d.global_concurrency_limit else None,
    )


def test_schedule_and_prefect_yaml_never_replace_each_others_deployment(service, tmp_path):
    # A prefect.yaml deployment a user named like the dataset: the name `schedule` gives its own by default.
    theirs = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0] | {"name": "fashion-mnist"}
    deploy_yaml(tmp_path / "project", [theirs])
    with client() as c:
        before = shape(c.read_deployment_by_name("textadapt-adapt/fashion-mnist"))
    p = cli("schedule", "fashion-mnist", "--cron", "0 5 * * *", *SMALL, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "textadapt-adapt/fashion-mnist exists and `textadapt schedule` did not make it" in p.stderr
    assert "work pool 'textadapt'" in p.stderr and "--name" in p.stderr and "--replace" in p.stderr
    with client() as c:
        assert shape(c.read_deployment_by_name("textadapt-adapt/fashion-mnist")) == before  # untouched

    # With --replace it becomes schedule's own: no pool (served), schedule's tag, its cron and options.
    cli("schedule", "fashion-mnist", "--cron", "0 5 * * *", *SMALL, "--replace")
    with client() as c:
        mine = shape(c.read_deployment_by_name("textadapt-adapt/fashion-mnist"))
    assert mine["pool"] is None and "textadapt-schedule" in mine["tags"] and mine["schedules"] == [("0 5 * * *", None, True)]
    assert mine["parameters"] == {"dataset": "fashion-mnist", **SMALL_PARAMETERS} and mine["limit"] == 1

    # Scheduling again updates schedule's own deployment in place.
    cli("schedule", "fashion-mnist", "--cron", "30 5 * * *", *SMALL)
    with client() as c:
        again = shape(c.read_deployment_by_name("textadapt-adapt/fashion-mnist"))
    assert again["id"] == mine["id"] and again["schedules"] == [("30 5 * * *", None, True)]

    # The shipped prefect.yaml, deployed beside it, registers its own names and leaves schedule's as it is ...
    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    deploy_yaml(tmp_path / "shipped", shipped)
    with client() as c:
        assert shape(c.read_deployment_by_name("textadapt-adapt/fashion-mnist")) == again
        names = {d.name for d in c.read_deployments()}
    assert names == {"fashion-mnist", *(d["name"] for d in shipped)}
    # ... and schedule leaves those alone.
    p = cli("schedule", "fashion-mnist", "--cron", "0 5 * * *", "--name", shipped[0]["name"], *SMALL, check=False)
    assert p.returncode == 2 and "did not make it" in p.stderr, p.stderr


def test_serve_serves_what_schedule_made_and_nothing_else(service, tmp_path, home):
    from prefect.client.schemas.objects import DeploymentStatus
    from prefect.deployments import run_deployment

    from textadapt.flows.adapt import adapt

    cli("schedule", "fashion-mnist", "--cron", "0 3 * * *", *SMALL)
    cli(
        "schedule",
        "fashion-mnist",
        "--cron",
        "0 4 * * 1",
        "--timezone",
        "Europe/Paris",
        "--name",
        "mondays",
        *SMALL,
        "--max-classes",
        "3",
    )
    deploy_yaml(tmp_path / "project", yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][:1])
    adapt.to_deployment(name="by-hand", tags=["textadapt"], parameters={"dataset": "fashion-mnist"}).apply()  # no pool
    served, others = ["fashion-mnist", "mondays"], ["fashion-mnist-nightly", "by-hand"]
    with client() as c:
        before = {n: shape(c.read_deployment_by_name(f"textadapt-adapt/{n}")) for n in served + others}
    assert all(before[n]["id"] for n in served + others)

    with Background("textadapt serve", [CLI, "serve"], tmp_path) as serve:

        def status():
            with client() as c:
                return {n: c.read_deployment_by_name(f"textadapt-adapt/{n}").status for n in served + others}

        wait_for(
            "serve to poll schedule's deployments",
            lambda: True if all(status()[n] == DeploymentStatus.READY for n in served) else None,
            120,
            serve,
        )
        time.sleep(25)  # two more of the runner's polls (every 10 s)
        assert [status()[n] for n in others] == [DeploymentStatus.NOT_READY] * 2, serve.log()

        # Serving re-applied schedule's deployments as they were: options, schedules, tags, one run at a time.
        with client() as c:
            after = {n: shape(c.read_deployment_by_name(f"textadapt-adapt/{n}")) for n in served + others}
        for n in served:
            assert {k: v for k, v in after[n].items() if k != "updated"} == {k: v for k, v in before[n].items() if k != "updated"}
        assert {n: after[n] for n in others} == {n: before[n] for n in others}

        # A run of a deployment serve does not serve stays where it is; one of schedule's runs, here with the run option
        # timeout_seconds overridden: the run stops when it is up, as TimedOut.
        ignored = run_deployment("textadapt-adapt/by-hand", timeout=0)
        timed = run_deployment("textadapt-adapt/fashion-mnist", parameters={"timeout_seconds": 1}, timeout=0)

        def final(flow_run_id):
            with client() as c:
                state = c.read_flow_run(flow_run_id).state
            return state if state.is_final() else None

        state = wait_for("the run with timeout_seconds=1 to end", lambda: final(timed.id), 180, serve)
        with client() as c:
            left = c.read_flow_run(ignored.id)
    assert left.state.is_scheduled() and left.start_time is None, left.state  # Scheduled, then Late: never started
    assert state.name == "TimedOut" and "took longer than its timeout (1 s" in state.message, (state, serve.log())
    [(status, error)] = cache_rows(home, f"SELECT status, error FROM runs WHERE flow_run_id = '{timed.id}'")
    assert status == "failed" and error.startswith("RunTimedOut: the run took longer than its timeout"), error


def test_two_runs_of_one_deployment_take_turns(service, tmp_path, home):
    """The one-writer rule as the deployment's concurrency limit: `serve --limit 2` would start both at once, but the
    deployment lets one run at a time; the second waits (AwaitingConcurrencySlot) and then runs. Without the limit both
    would open the cache to write, and the second would fail."""
    from prefect.deployments import run_deployment

    cli("schedule", "fashion-mnist", "--cron", "0 3 * * *", *SMALL)
    with Background("textadapt serve", [CLI, "serve", "--limit", "2"], tmp_path) as serve:
        first = run_deployment("textadapt-adapt/fashion-mnist", timeout=0)
        second = run_deployment("textadapt-adapt/fashion-mnist", timeout=0)
        seen = []  # (state of first, state of second), as they change

        def both_done():
            with client() as c:
                states = tuple(c.read_flow_run(r.id).state for r in (first, second))
            names = tuple(s.name for s in states)
            if not seen or seen[-1] != names:
                seen.append(names)
            return states if all(s.is_final() for s in states) else None

        states = wait_for("both runs to end", both_done, 300, serve, every=1.0)
    assert all(s.is_completed() for s in states), (states, serve.log())
    assert ("Running", "Running") not in seen, seen
    assert any("AwaitingConcurrencySlot" in names for names in seen), seen
    with client() as c:
        runs = sorted((c.read_flow_run(r.id) for r in (first, second)), key=lambda r: r.start_time)
    assert runs[1].start_time >= runs[0].end_time  # one after the other
    rows = cache_rows(home, "SELECT flow_run_id, status FROM runs ORDER BY started_at")
    assert rows == [(str(runs[0].id), "completed"), (str(runs[1].id), "completed")]
