"""The cluster profile: each step of a run a task on Celery workers (dagster-celery), Redis as
broker and result backend, PostgreSQL as the instance (``deploy/dagster.celery.yaml``,
docs/deploy.md).

One Celery configuration serves both ends: the run worker that submits a run's steps
(:func:`cluster_executor`, ``DICOM_ASSETS_EXECUTOR=celery``) and the Celery workers that run
them (:func:`make_worker_app`, the app of ``celery -A dicom_assets.celery_app worker``).

At-least-once delivery, made safe:

- a task is acknowledged when its step has ended, not when a worker takes it (``acks_late``),
  and a worker takes one task at a time (prefetch 1): a worker killed in the middle of a step
  leaves its task unacknowledged, and Redis gives it to another worker once
  ``DICOM_ASSETS_CELERY_VISIBILITY_TIMEOUT`` has passed (a pool process killed under a living
  worker is re-queued at once: ``reject_on_worker_lost``);
- a task delivered again is checked against the run's event log before anything runs
  (:func:`_delivery_verdict`): a step that already succeeded in its run is not run twice (its
  recorded events are handed back), and a task of a run that has ended is dropped;
- every step writes atomically (a temporary sibling renamed into place, strays of a killed
  writer swept by the next one) and XNAT upload sends only what XNAT lacks, so a step run
  again after a kill converges on the same outputs.

The broker URL, which may carry a password, is read from the environment by each process
(``DICOM_ASSETS_CELERY_BROKER``), never written in a file or in the run's config.
"""

from __future__ import annotations

import os
import socket

#: the op tag dagster-celery routes a step by (``dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG``)
QUEUE_TAG = "dagster-celery/queue"
#: every step not tagged otherwise (dagster-celery's default queue)
DEFAULT_QUEUE = "dagster"
#: the CPU-heavy steps: organize (reads every header), tarball, BIDS conversion
CPU_QUEUE = "cpu"
#: XNAT uploads: a worker (or a few) whose concurrency is the site's upload limit
XNAT_QUEUE = "xnat"
QUEUES = (DEFAULT_QUEUE, CPU_QUEUE, XNAT_QUEUE)
#: seconds between two polls of a run's step results (dagster-celery's TICK_SECONDS, 1 s)
POLL_SECONDS = 0.2


def on_queue(queue: str) -> dict[str, str]:
    """The op tags that put a step on ``queue`` (ignored by the other executors)."""
    return {QUEUE_TAG: queue}


def celery_config(visibility_timeout: float) -> dict:
    """Celery's settings for both ends (submitter and workers)."""
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": DEFAULT_QUEUE,
        "task_default_priority": 5,
        "broker_connection_retry_on_startup": True,
        # Redis: an unacknowledged task goes back to its queue after this long (its worker is gone);
        # the reconnect settings are dagster-celery's defaults
        "broker_transport_options": {"visibility_timeout": visibility_timeout,
                                     # how often a worker gives back the tasks of vanished ones
                                     "unacked_restore_interval": max(1.0, min(10.0, visibility_timeout / 4)),
                                     "max_retries": 3,
                                     "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        "result_backend_transport_options": {"retry_policy": {"timeout": 30.0}},
        "result_expires": 7 * 24 * 3600,
        "worker_hijack_root_logger": False,
    }


def cluster_executor():
    """dagster-celery's executor, its broker and backend read from the environment when a run
    starts (Dagster's ``env`` config source: the URL is in no stored config)."""
    from dagster_celery import celery_executor, core_execution_loop

    from ..settings import current

    # how often a run's process asks Redis whether its steps are done: dagster-celery's 1 s is up
    # to a second lost per step (measured in bench/celery.py); a poll costs one Redis GET per step
    core_execution_loop.TICK_SECONDS = POLL_SECONDS
    settings = current()
    backend_var = "DICOM_ASSETS_CELERY_BACKEND" if settings.celery_backend is not None else "DICOM_ASSETS_CELERY_BROKER"
    return celery_executor.configured({
        "broker": {"env": "DICOM_ASSETS_CELERY_BROKER"},
        "backend": {"env": backend_var},
        "config_source": celery_config(settings.celery_visibility_timeout),
        # a step's RetryPolicy (XNAT's) is honoured across workers
        "retries": {"enabled": {}},
    }, name="celery")


def worker_identity() -> str:
    """``host:pid`` of this process, as a message names the worker it comes from."""
    return f"{socket.gethostname()}:{os.getpid()}"


def make_worker_app():
    """The Celery app of the workers: dagster-celery's app and queues, this module's settings,
    and its ``execute_plan`` task run through the delivery check."""
    from dagster_celery.config import dict_wrapper
    from dagster_celery.make_app import make_app

    from ..settings import current

    settings = current()
    broker, backend = settings.celery_urls
    app = make_app({"broker": broker, "backend": backend, "include": [],
                    "config_source": dict_wrapper(celery_config(settings.celery_visibility_timeout))})
    _register_execute_plan(app)
    return app


def _register_execute_plan(app):
    """dagster-celery's ``execute_plan`` task (same name, same arguments, same events), with the
    delivery check first and the worker's host and pid in its engine event."""
    from dagster import _check as check
    from dagster._core.definitions.reconstruct import ReconstructableJob
    from dagster._core.events import EngineEventData
    from dagster._core.execution.api import create_execution_plan, execute_plan_iterator
    from dagster._grpc.types import ExecuteStepArgs
    from dagster._serdes import serialize_value, unpack_value
    from dagster_celery.config import TASK_EXECUTE_PLAN_NAME
    from dagster_celery.core_execution_loop import DELEGATE_MARKER
    from dagster_celery.executor import CeleryExecutor

    @app.task(bind=True, name=TASK_EXECUTE_PLAN_NAME)
    def execute_plan(self, execute_step_args_packed, executable_dict):
        args = unpack_value(check.dict_param(execute_step_args_packed, "execute_step_args_packed"),
                            as_type=ExecuteStepArgs)
        steps = list(args.step_keys_to_execute or [])
        instance = _instance(args.instance_ref)
        run = instance.get_run_by_id(args.run_id)
        check.invariant(run, f"Could not load run {args.run_id}")
        verdict, recorded = _delivery_verdict(instance, run, steps)
        who = f"{self.request.hostname} (pid {os.getpid()})"
        if verdict != "run":
            instance.report_engine_event(
                f"Celery worker {who}: step {', '.join(steps)} not run again: {verdict}", run,
                EngineEventData({"Celery worker": who}, marker_end=DELEGATE_MARKER), CeleryExecutor,
                step_key=steps[0] if len(steps) == 1 else None)
            return [serialize_value(e) for e in recorded]
        recon_job = ReconstructableJob.from_dict(check.dict_param(executable_dict, "executable_dict"))
        plan = create_execution_plan(recon_job, run.run_config, step_keys_to_execute=steps,
                                     known_state=args.known_state)
        events = [instance.report_engine_event(
            f"Executing steps {', '.join(steps)} in celery worker {who}", run,
            EngineEventData({"step_keys": ", ".join(steps), "Celery worker": who}, marker_end=DELEGATE_MARKER),
            CeleryExecutor, step_key=plan.step_handle_for_single_step_plans().to_key())]
        events.extend(execute_plan_iterator(execution_plan=plan, job=recon_job, dagster_run=run,
                                            instance=instance, retry_mode=args.retry_mode,
                                            run_config=run.run_config))
        return [serialize_value(e) for e in events]

    return execute_plan


_INSTANCES: dict = {}


def _instance(ref):
    """One instance per instance ref in a worker process (its database connections kept from
    task to task: a step pays no new connection)."""
    from dagster import DagsterInstance
    from dagster._serdes import serialize_value

    key = serialize_value(ref)
    if key not in _INSTANCES:
        _INSTANCES[key] = DagsterInstance.from_ref(ref)
    return _INSTANCES[key]


def _delivery_verdict(instance, run, steps: list[str]):
    """("run", []) for a task to execute; otherwise why not, and the events to hand back: a run
    that has ended (its task came back after the run was failed or retried: nobody waits for it),
    or a step that already succeeded in this run (a task delivered twice: its recorded events)."""
    from dagster import DagsterEventType

    if run.is_finished:
        return f"run {run.run_id} already ended ({run.status.value}); a task delivered again is dropped", []
    if len(steps) != 1:
        return "run", []
    step = steps[0]
    records = instance.all_logs(run.run_id)
    mine = [r.dagster_event for r in records if r.dagster_event is not None and r.dagster_event.step_key == step]
    last = next((e for e in reversed(mine) if e.event_type in (
        DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE,
        DagsterEventType.STEP_UP_FOR_RETRY, DagsterEventType.STEP_RESTARTED)), None)
    if last is not None and last.event_type == DagsterEventType.STEP_SUCCESS:
        start = max(i for i, e in enumerate(mine) if e.event_type in (DagsterEventType.STEP_START,
                                                                      DagsterEventType.STEP_RESTARTED))
        return f"it already succeeded in run {run.run_id} (a task delivered twice)", mine[start:]
    return "run", []
