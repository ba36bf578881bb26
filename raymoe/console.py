"""Ray's known-harmless console noise, silenced in one place, each with the reason.

A healthy run then prints raymoe's own lines and only those warnings and errors of Ray
that mean something. ``quiet_ray`` runs in every raymoe process that uses Ray (the driver
before it starts or joins a cluster, and each training worker);
``drop_harmless_worker_lines`` on the driver once it is connected.
"""

from __future__ import annotations

import functools
import logging
import os

HARMLESS_WORKER_LINES = (
    # Ray Train's own PreemptionWatcher is a restartable actor given its workers' handles as
    # constructor arguments; the TrainController's core worker logs that at error level on
    # every run (ray-project/ray#53727). Nothing of raymoe's depends on it.
    ("'PreemptionWatcher'", "max_restarts > 0"),
)


class _DropTokenAuthNotice(logging.Filter):
    """A local cluster that raymoe starts has token authentication on by default, and Ray
    warns that it is *on*; the warning that it is *off* stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def quiet_ray() -> None:
    import ray.data
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _DropTokenAuthNotice())
    # Ray Data's per-dataset INFO lines (execution plans, "Starting execution"): raymoe
    # streams many small datasets and reports its own progress.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Progress bars are off on purpose (raymoe prints one progress line); Ray Data warns
    # about that once per process, which reads like a failure.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Each ray.train.report logs an INFO line (its logger is named after its module's file);
    # raymoe's progress line already says what was reported.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def is_harmless(line: str) -> bool:
    return any(all(part in line for part in parts) for parts in HARMLESS_WORKER_LINES)


def drop_harmless_worker_lines() -> None:
    """Filter the worker log lines Ray forwards to this driver (log_to_driver).

    Ray has no public hook for this: the driver's printer is wrapped in place (Ray is
    pinned to 2.60.x; if its internals move, the lines simply print as before).
    """
    try:
        from ray._private import worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    printer = functools.partial(worker.print_to_stdstream,
                                ignore_prefix=worker._should_ignore_worker_log_prefix(worker.global_worker))

    def print_meaningful(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not is_harmless(line)]
        if lines:
            printer({**data, "lines": lines})

    if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", print_meaningful)


def connect_ray(address: str | None, num_cpus: int | None = None, worker_logs: bool = True) -> None:
    """Join the cluster at ``address`` or RAY_ADDRESS (as in a Ray job), else start a
    local one of ``num_cpus``; its known noise silenced. ``worker_logs=False``: the workers'
    lines stay in Ray's log files (a study prints a line per trial instead)."""
    import ray

    local = address is None and not os.environ.get("RAY_ADDRESS")
    quiet_ray()
    ray.init(address=address, num_cpus=num_cpus if local else None, log_to_driver=worker_logs)
    drop_harmless_worker_lines()
