"""Scheduled runs: Prefect deployments of the adaptation flow, made by ``textadapt schedule`` and run by ``textadapt serve``.

``textadapt schedule DATASET --cron ...`` checks the cron, the run options and the dataset (as a run
checks them), then creates or updates the deployment ``textadapt-adapt/NAME`` (NAME: ``--name``, else
the dataset). Its parameters are the run options given, one flow parameter each: a run triggered with
other values for some keeps the rest. ``textadapt serve`` runs the scheduled (and manually triggered)
runs of exactly those deployments from this machine. ``prefect.yaml`` at the repository root declares
deployments for a work pool instead (``prefect deploy``; a worker runs them).

**Whose deployment it is.** ``schedule`` tags what it makes ``textadapt-schedule``; ``serve`` serves the
deployments of this flow with that tag and no work pool, nothing else. ``schedule`` updates a deployment
it made, and refuses to touch one it did not make (a prefect.yaml one, or one made by hand), unless
``--replace``: then it deletes it and makes its own. prefect.yaml's deployments are named apart from the
bare dataset names ``schedule`` uses (``fashion-mnist-nightly``), so ``prefect deploy`` does not replace
``schedule``'s.

**One writer.** A cache file has one writing process at a time. Every deployment allows one flow run at
once (``concurrency_limit: 1``, collision strategy ENQUEUE): a run due while another of the same
deployment runs waits (state AwaitingConcurrencySlot), however many ``serve`` processes or workers
there are. Runs of different deployments on one cache take turns through ``serve``'s ``--limit 1`` (one
``serve`` per cache) or the work pool's concurrency limit (prefect.yaml's pool: 1); the cache's own
writer lock refuses a second writer that gets past all of these, with the first one's pid and run.
"""

from __future__ import annotations

from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags, FlowFilter, FlowFilterName
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.responses import DeploymentResponse
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound
from pydantic import ValidationError

from textadapt import TextadaptError, checks
from textadapt.config import RunOptions, Settings
from textadapt.flows.adapt import adapt
from textadapt.llm import make_backend

TAG = "textadapt"  # on every textadapt deployment (prefect.yaml's too)
MADE_BY_SCHEDULE = "textadapt-schedule"  # on the deployments `textadapt schedule` makes: what `textadapt serve` serves
ONE_RUN_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def require_server() -> str:
    """The Prefect API deployments live in; a temporary local API would forget them."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise TextadaptError(
            "scheduled runs need a Prefect server: start one (`prefect server start`) and set "
            "PREFECT_API_URL, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url


def cron_schedule(cron: str, timezone: str | None = None) -> CronSchedule:
    """The schedule, or one line naming the flag and value that are wrong (not pydantic's report)."""
    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as e:
        if any(err["loc"] and err["loc"][0] == "timezone" for err in e.errors()):
            raise TextadaptError(
                f"--timezone {timezone!r} is not a time zone: give an IANA name, e.g. Europe/Paris, America/New_York or UTC"
            ) from None
        raise TextadaptError(
            f"--cron {cron!r} is not a cron schedule: five fields, minute hour day-of-month month "
            'day-of-week, e.g. "0 3 * * *" (03:00 every day) or "0 4 * * 0" (04:00 on Sundays)'
        ) from None


def check_inputs(options: RunOptions, settings: Settings | None = None) -> None:
    """The run's inputs, checked as the run itself checks them (``checks.run_inputs``: the dataset spec, its test images,
    the templates, the report folder), and its LLM spec (a model file missing here; a server is not asked: it may be up
    only when the run is)."""
    settings = settings or Settings()
    inputs = checks.run_inputs(options, settings)
    if inputs.templates:
        make_backend(options.llm or settings.llm, settings).close()


def runner_deployment(options: RunOptions, schedule: CronSchedule | None, name: str | None = None) -> RunnerDeployment:
    # The module path, not the file: the flow is found wherever textadapt is installed.
    return adapt.to_deployment(
        name=name or options.dataset,
        schedules=[schedule] if schedule else None,
        parameters=options.model_dump(mode="json", exclude_defaults=True) | {"dataset": options.dataset},
        tags=[TAG, MADE_BY_SCHEDULE, options.dataset],
        description=f"textadapt: adapt CLIP to {options.dataset} from text alone (made by `textadapt schedule`)",
        concurrency_limit=ONE_RUN_AT_A_TIME,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def _read(client, name: str) -> DeploymentResponse | None:
    try:
        return client.read_deployment_by_name(f"{adapt.name}/{name}")
    except ObjectNotFound:
        return None


def _made_elsewhere(d: DeploymentResponse) -> str:
    where = (
        f"it runs on work pool {d.work_pool_name!r}, as prefect.yaml's do"
        if d.work_pool_name
        else f"it has no tag {MADE_BY_SCHEDULE!r}"
    )
    return (
        f"deployment {adapt.name}/{d.name} exists and `textadapt schedule` did not make it ({where}), so it is left as "
        "it is: give this schedule another --name, or add --replace to delete that deployment and make this one"
    )


def schedule(options: RunOptions, cron: str, timezone: str | None = None, name: str | None = None, replace: bool = False) -> UUID:
    """Create the deployment of ``options.dataset`` with this cron schedule, or update the one ``schedule`` made
    (see the module's docstring for one it did not make); returns its id. Every check comes first: the cron, the
    server, the run's inputs; nothing is created if one fails."""
    when = cron_schedule(cron, timezone)
    require_server()
    check_inputs(options)
    name = name or options.dataset
    with get_client(sync_client=True) as client:
        existing = _read(client, name)
        if existing is not None and MADE_BY_SCHEDULE not in existing.tags:
            if not replace:
                raise TextadaptError(_made_elsewhere(existing))
            client.delete_deployment(existing.id)
    return runner_deployment(options, when, name).apply()


def scheduled() -> list[RunnerDeployment]:
    """The deployments ``textadapt schedule`` made, as the Prefect server has them now."""
    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[adapt.name])),
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[MADE_BY_SCHEDULE])),
        )
    out = []
    for d in found:
        if d.work_pool_name:  # run by a worker of its pool, not served from here
            continue
        try:
            options = RunOptions.parse(d.parameters)
        except TextadaptError as e:
            raise TextadaptError(
                f"deployment {adapt.name}/{d.name}: {e}; fix its parameters, or make it again with `textadapt schedule`"
            ) from None
        dep = runner_deployment(options, None, d.name)
        # as they are on the server (cron, timezone, active): serving re-applies the deployment
        dep.schedules = [DeploymentScheduleCreate(schedule=s.schedule, active=s.active) for s in d.schedules]
        dep.paused = d.paused
        out.append(dep)
    return out


def serve(limit: int | None = 1) -> None:
    """Serve every deployment ``textadapt schedule`` made from this process until interrupted; at most ``limit`` flow
    runs at once (the runs of one ``serve`` share this machine's cache, so 1 by default).

    Stopping leaves the schedules as they are (they are paused only with ``prefect deployment pause``).
    """
    from prefect import serve as prefect_serve

    require_server()
    deployments = scheduled()
    if not deployments:
        raise TextadaptError('no textadapt deployment to serve: create one with `textadapt schedule DATASET --cron "0 3 * * *"`')
    prefect_serve(*deployments, limit=limit, pause_on_shutdown=False)
