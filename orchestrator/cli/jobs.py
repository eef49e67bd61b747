"""`mmae launch`, `status`, `logs`, `down`: run jobs here or on SkyPilot clusters and watch them.

Commands are thin: the work happens in `orchestrator.launch` (task, checks, boundary to SkyPilot) and
`orchestrator.runtime.local` (runs on this machine), imported inside the command bodies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.cli import console
from orchestrator.cli.options import DryRunOpt, JobArg, JsonOpt, LocalOpt, SetOpt, YesOpt, typer_factory

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

app = typer_factory()  # no name: app.py merges these commands into the root (mmae launch, not mmae jobs launch)

DetachOpt = Annotated[
    bool, typer.Option("--detach", "-d", help="Return once SkyPilot has the request; do not stream logs.")
]
FreshOpt = Annotated[
    bool, typer.Option("--fresh", help="Start a new MLflow run and checkpoint folder instead of resuming this job's.")
]
ManagedOpt = Annotated[
    bool,
    typer.Option("--managed", help="Run as a SkyPilot managed job (relaunched after failures); implied by "
                 "resources.use_spot."),
]
AllOpt = Annotated[bool, typer.Option("--all", "-a", help="Every run (not only the 20 newest) and every user's "
                                      "clusters.")]
FollowOpt = Annotated[bool, typer.Option("--follow/--no-follow", "-f", help="Keep streaming until the job ends.")]
TargetArg = Annotated[
    str,
    typer.Argument(metavar="RUN|CLUSTER", help="An MLflow run id, a SkyPilot cluster name, or a managed-job name or "
                   "id (see `mmae status`).", show_default=False),
]


@app.command("launch")
def launch(
    job: JobArg,
    sets: SetOpt = None,
    dry_run: DryRunOpt = False,
    detach: DetachOpt = False,
    yes: YesOpt = False,
    local: LocalOpt = False,
    fresh: FreshOpt = False,
    managed: ManagedOpt = False,
) -> None:
    """Launch a job on a SkyPilot cluster, or with --local on this machine.

    Shows nodes, accelerators, spot and the estimated price and asks before launching (unless --yes). With
    resources.use_spot (or --managed) it runs as a SkyPilot managed job that recovers from preemption and resumes
    from the last checkpoint in the same MLflow run. --dry-run prints the SkyPilot task YAML on stdout and
    contacts no cloud.
    """
    from orchestrator import spec

    resolved = spec.load_job(job, sets or [])
    launch_resolved(resolved, dry_run=dry_run, detach=detach, yes=yes, local=local, fresh=fresh, managed=managed)


def launch_resolved(resolved: JobSpec, *, dry_run: bool = False, detach: bool = False, yes: bool = False,
                    local: bool = False, fresh: bool = False, managed: bool = False) -> str | None:
    """Launch a validated job here (--local; returns the MLflow run id) or on SkyPilot (what `mmae launch` does
    after loading the job file; `mmae finetune` calls it too)."""
    from orchestrator.errors import UserError

    if local:
        if dry_run or managed or detach:
            raise UserError("--local runs here and now: it does not combine with --dry-run, --managed or --detach")
        from orchestrator.runtime.local import run_local

        run_id = run_local(resolved, fresh=fresh)
        console.info(f"run {run_id} done; see `mmae status`")
        console.out(run_id)
        return run_id

    from orchestrator.launch import sky as sky_task

    plan = sky_task.plan_launch(resolved, managed=managed, fresh=fresh, contact=not dry_run)
    for warning in plan.warnings:
        console.warn(warning)
    sky_task.make_task(plan.config)  # SkyPilot's own parser checks the task before anything is printed or sent
    if dry_run:
        console.out(plan.yaml())
        console.info(f"dry run: nothing launched. Launch this YAML with SkyPilot itself: "
                     f"{sky_task.sky_launch_hint(plan)}")
        return None

    from orchestrator.launch.boundary import get_boundary

    boundary = get_boundary()
    for line in plan.describe(sky_task.estimate_price(plan, boundary)):
        console.info(line)
    if not console.confirm("Launch?", yes=yes):
        import sys

        if not sys.stdin.isatty():
            raise UserError("launching costs money and there is no terminal to confirm on: pass --yes")
        console.info("not launched")
        raise typer.Exit(1)
    result = sky_task.submit(plan, boundary, detach=detach)
    if plan.managed:
        ids = ", ".join(str(i) for i in result.get("job_ids") or []) or "(pending)"
        console.info(f"managed job {plan.job.name}: id {ids}; watch with `mmae status`, stop with "
                     f"`mmae down {plan.job.name}`")
    else:
        console.info(f"cluster {plan.cluster_name}: watch with `mmae status` or `mmae logs {plan.cluster_name}`, "
                     f"stop with `mmae down {plan.cluster_name}` (it tears itself down "
                     f"{sky_task.AUTODOWN_IDLE_MINUTES} min after the job ends)")
    code = result.get("returncode")
    if code:
        raise typer.Exit(int(code))
    return None


@app.command("status")
def status(as_json: JsonOpt = False, all_: AllOpt = False) -> None:
    """Show runs (from MLflow) with their SkyPilot clusters and managed jobs.

    Columns: name, stage, state, steps, loss, img/s, started, duration, run id, parent, cluster, SkyPilot state,
    resources, recoveries. Works offline: what cannot be reached is named in one line on stderr. The tracking
    store is MLFLOW_TRACKING_URI, else .mmae/mlflow.db in the current folder. A SkyPilot API server is asked only
    when it is already running (or SKYPILOT_API_SERVER_ENDPOINT names one).
    """
    from orchestrator.launch import status as status_lib

    report = status_lib.collect(all_runs=all_)
    if as_json:
        console.print_json(report.to_json())
    else:
        console.out(console.table(report.rows, status_lib.COLUMNS, empty="no runs, clusters or managed jobs"))
    note = report.note()
    if note:
        console.warn(f"not reached: {note}")


@app.command("logs")
def logs(target: TargetArg, follow: FollowOpt = True) -> None:
    """Stream the logs of a run's SkyPilot job (a cluster's latest job, or a managed job)."""
    from orchestrator.launch import status as status_lib
    from orchestrator.launch.boundary import get_boundary

    boundary = get_boundary()
    resolved = status_lib.resolve_target(target, boundary)
    console.info(f"logs of {resolved.describe()}")
    code = status_lib.tail_logs(resolved, boundary, follow=follow)
    if code:
        raise typer.Exit(code)


@app.command("down")
def down(target: TargetArg, yes: YesOpt = False) -> None:
    """Tear down a run's cluster, or cancel its managed job (which takes its cluster down too)."""
    from orchestrator.errors import UserError
    from orchestrator.launch import status as status_lib
    from orchestrator.launch.boundary import get_boundary

    boundary = get_boundary()
    resolved = status_lib.resolve_target(target, boundary)
    action = "cancel" if resolved.managed_job_id is not None else "tear down"
    if not console.confirm(f"{action.capitalize()} {resolved.describe()}? Its disks are lost.", yes=yes):
        import sys

        if not sys.stdin.isatty():
            raise UserError(f"refusing to {action} {resolved.describe()} without confirmation: pass --yes")
        console.info("nothing done")
        raise typer.Exit(1)
    status_lib.down(resolved, boundary)
    console.info(f"{'cancelled' if action == 'cancel' else 'tore down'} {resolved.describe()}")
