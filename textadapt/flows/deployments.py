"""Scheduled runs: one Prefect deployment of the adaptation flow per dataset.

``textadapt schedule DATASET --cron ...`` creates or updates the deployment ``textadapt-adapt/DATASET``
(its parameters are the run options given, one flow parameter each: a run triggered with other
values for some keeps the rest); ``textadapt serve`` runs the scheduled (and manually triggered)
runs of every such deployment from this machine. ``prefect.yaml`` at the repository root declares
the same kind of deployment for a work pool instead (``prefect deploy``).
"""

from __future__ import annotations

from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags, FlowFilter, FlowFilterName
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from textadapt import TextadaptError
from textadapt.config import RunOptions
from textadapt.flows.adapt import adapt

TAG = "textadapt"  # on every deployment `textadapt schedule` makes: what `textadapt serve` serves


def require_server() -> str:
    """The Prefect API deployments live in; a temporary local API would forget them."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise TextadaptError("scheduled runs need a Prefect server: start one (`prefect server start`) and set "
                             "PREFECT_API_URL, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def cron_schedule(cron: str, timezone: str | None = None) -> CronSchedule:
    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValueError as e:
        raise TextadaptError(f"--cron {cron!r} / --timezone {timezone!r}: {str(e).splitlines()[-1].strip()}") from None


def runner_deployment(options: RunOptions, schedule: CronSchedule | None, name: str | None = None) -> RunnerDeployment:
    # The module path, not the file: the flow is found wherever textadapt is installed.
    return adapt.to_deployment(
        name=name or options.dataset,
        schedules=[schedule] if schedule else None,
        parameters=options.model_dump(mode="json", exclude_defaults=True) | {"dataset": options.dataset},
        tags=[TAG, options.dataset],
        description=f"textadapt: adapt CLIP to {options.dataset} from text alone",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def schedule(options: RunOptions, cron: str, timezone: str | None = None, name: str | None = None) -> UUID:
    """Create or update the deployment of ``options.dataset`` with this cron schedule; returns its id."""
    require_server()
    return runner_deployment(options, cron_schedule(cron, timezone), name).apply()


def scheduled() -> list[RunnerDeployment]:
    """The deployments ``textadapt schedule`` made, as the Prefect server has them now."""
    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[adapt.name])),
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[TAG])),
        )
    out = []
    for d in found:
        if d.work_pool_name:  # run by a worker of its pool (prefect.yaml), not served from here
            continue
        # Deployments made before the flow took one parameter per option had them all in one `options`.
        parameters = d.parameters.get("options", d.parameters)
        options = RunOptions.parse(parameters)
        dep = runner_deployment(options, None, d.name)
        # as they are on the server (cron, timezone, active): serving re-applies the deployment
        dep.schedules = [DeploymentScheduleCreate(schedule=s.schedule, active=s.active) for s in d.schedules]
        dep.paused = d.paused
        out.append(dep)
    return out


def serve(limit: int | None = 1) -> None:
    """Serve every scheduled textadapt deployment from this process until interrupted.

    Stopping leaves the schedules as they are (they are paused only with ``prefect deployment pause``).
    """
    from prefect import serve as prefect_serve

    require_server()
    deployments = scheduled()
    if not deployments:
        raise TextadaptError("no textadapt deployment to serve: create one with `textadapt schedule DATASET --cron \"0 3 * * *\"`")
    prefect_serve(*deployments, limit=limit, pause_on_shutdown=False)
