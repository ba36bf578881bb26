"""Zero-shot evaluation of a checkpoint on expert-parallel inference groups."""

from __future__ import annotations

from raymoe.eval.harness import EvalOptions, EvalResults, evaluate
from raymoe.infer.group import GroupOptions, InferenceGroups, check_group_shape
from raymoe.runs import checkpoint_manifest


def evaluate_sharded(checkpoint: str, options: EvalOptions, group: GroupOptions,
                     show_progress: bool = True) -> EvalResults:
    """The numbers of one process, from ``group.replicas`` groups of ``group.ep`` Ray
    actors (this process reads only the manifest). The results carry each rank's
    parameter bytes."""
    manifest = checkpoint_manifest(checkpoint)
    check_group_shape(manifest, group.ep, group.replicas)
    with InferenceGroups(manifest["uri"], group) as groups:
        results = evaluate(options, groups.score(options), manifest["uri"],
                           int(manifest["extra"].get("step", 0)), show_progress)
        results.resident = groups.resident
    return results
