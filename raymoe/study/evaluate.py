"""Zero-shot evaluation of each finished trial's final checkpoint, its results saved in
the study's storage (again only when the checkpoint changed)."""

from __future__ import annotations

import json

from raymoe.config import load_config
from raymoe.data.storage import locate
from raymoe.errors import RaymoeError
from raymoe.runs import find_checkpoint, run_location
from raymoe.study.spec import Study


def evaluate_trials(study: Study, skip: set[str]) -> dict[str, str]:
    """Returns the trials whose evaluation failed for a reason the user can fix, with why
    (one line each); any other error is a bug and propagates with its traceback."""
    from raymoe.eval.runner import evaluate_on_nodes

    assert study.eval is not None
    failed = {}
    for trial in study.trials():
        if trial["name"] in skip:
            continue
        out = locate(study.eval_uri(trial["name"]))
        try:
            checkpoint = find_checkpoint(run_location(load_config(trial["config"], trial["overrides"])).uri)
            if out.exists() and json.loads(out.read_bytes())["checkpoint"] == checkpoint:
                continue
            print(f"evaluating {trial['name']} ({', '.join(study.eval.options.tasks)})", flush=True)
            results = evaluate_on_nodes(checkpoint, study.eval.options, study.eval.nodes)
            out.write_bytes((json.dumps(results.to_dict(), indent=1) + "\n").encode())
        except RaymoeError as err:
            failed[trial["name"]] = f"{type(err).__name__}: {err}"
    return failed
