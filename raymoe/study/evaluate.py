"""Zero-shot evaluation of each finished trial's final checkpoint, its results saved in
the study's storage (again only when the checkpoint changed)."""

from __future__ import annotations

import json

from raymoe.config import config_from_dict, load_config
from raymoe.data.storage import locate
from raymoe.errors import RaymoeError
from raymoe.eval.harness import EvalResults
from raymoe.runs import find_checkpoint, run_location
from raymoe.study.spec import Study


def evaluate_trials(study: Study, skip: set[str]) -> dict[str, str]:
    """Returns the trials whose evaluation failed for a reason the user can fix, with why
    (one line each); any other error is a bug and propagates with its traceback."""
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
            results = _evaluate(checkpoint, study, trial["name"])
            out.write_bytes((json.dumps(results.to_dict(), indent=1) + "\n").encode())
        except RaymoeError as err:
            failed[trial["name"]] = f"{type(err).__name__}: {err}"
    return failed


def _evaluate(checkpoint: str, study: Study, trial: str) -> EvalResults:
    """On one actor per node holding the whole model, or on an expert-parallel group of
    the size the study asks for (or, by default, the smallest whose ranks fit the nodes)."""
    from raymoe.eval.runner import cluster_node_memory, evaluate_on_nodes, expert_parallel_size, inference_bytes
    from raymoe.infer.evaluate import evaluate_sharded
    from raymoe.infer.group import GroupOptions
    from raymoe.runs import checkpoint_manifest

    assert study.eval is not None
    manifest = checkpoint_manifest(checkpoint)
    experts = config_from_dict(manifest["extra"]["config"]).model.moe.num_experts
    ep = (study.eval.ep or expert_parallel_size(manifest, cluster_node_memory())) if experts else 1
    where = f"an expert-parallel group of {ep}" if ep > 1 else "one actor per node"
    print(f"evaluating {trial} ({', '.join(study.eval.options.tasks)}) on {where}", flush=True)
    if ep == 1:
        return evaluate_on_nodes(checkpoint, study.eval.options, study.eval.nodes)
    group = GroupOptions(ep, memory_per_rank=inference_bytes(manifest, ep))
    return evaluate_sharded(checkpoint, study.eval.options, group, show_progress=False)
