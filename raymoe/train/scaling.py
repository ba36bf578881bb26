"""An elastic group resizes only for a new layout.

Ray Train's elastic policy restarts the group whenever the number of workers the cluster
holds changes. Each restart loses the work since the last checkpoint and re-reads the
checkpoint on every rank, yet many counts train alike: a global batch of 128 micro-batches
trains on 64 workers whether 64, 72 or 120 are there (raymoe.train.layout), so nodes that
return one at a time would restart a 128-GPU run up to seven times for nothing. This policy
counts the workers as the layout would train on them, so Ray starts a group of exactly that
many (no worker idles) and restarts it only when that number changes.

Ray Train 2.60 builds its scaling policy from the ScalingConfig alone;
raymoe.train.failures.RaymoeTorchTrainer hands its controller this one instead."""

from __future__ import annotations

from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy
from ray.train.v2.api.config import ScalingConfig

from raymoe.config import Config
from raymoe.train.layout import plan_layout


def trained_workers(cfg: Config) -> dict[int, int]:
    """Workers the cluster holds -> workers the layout trains on, for an elastic config's
    range [MIN, MAX]."""
    par = cfg.parallel
    return {n: plan_layout(cfg, n).workers for n in range(par.min_workers, par.max_workers + 1)}


class LayoutScalingPolicy(ElasticScalingPolicy):
    """Ray's elastic policy, with the workers it could start counted as the layout trains
    on them (below MIN as they are: Ray then waits)."""

    def __init__(self, scaling_config: ScalingConfig, trained: dict[int, int]):
        super().__init__(scaling_config)
        self.trained = trained

    def _count_possible_workers(self, reserved_resources) -> int:
        available = super()._count_possible_workers(reserved_resources)
        return self.trained.get(available, available)
