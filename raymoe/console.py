"""Ray's known-harmless console noise, silenced in one place, each with the reason.

Called in every raymoe process that uses Ray: the driver (``connect_ray``) and each
training worker. A healthy run then prints raymoe's own lines and Ray's warnings or errors
that mean something.
"""

from __future__ import annotations

import logging


def quiet_ray() -> None:
    import ray.data
    from ray.train.v2._internal.execution import context as train_context

    # Ray Data's per-dataset INFO lines (execution plans, "Starting execution"): raymoe
    # streams many small datasets and reports its own progress.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Progress bars are off on purpose (raymoe prints one progress line); Ray Data warns
    # about that once per process and dataset reader, which reads like a failure.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Each ray.train.report logs an INFO line (its logger is named after its module's file);
    # raymoe's progress line already says what was reported.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
