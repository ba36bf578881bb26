"""Dollars per run and per billion tokens at the cluster YAML's instance price."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from raymoe.config import Config
from raymoe.plan.hardware import HARDWARE, Hardware, PlanError
from raymoe.plan.timing import TimeEstimate

INSTANCE_PRICES = {
    "p4d.24xlarge": 32.77,
    "p4de.24xlarge": 40.97,
    "p5.48xlarge": 55.04,
    "p5en.48xlarge": 63.30,
}
"""On-demand USD per hour in us-east-1 (AWS list prices of 2025; pass your own with
--price-per-hour)."""
SPOT_SHARE = 1 / 3
"""Spot price over the on-demand list price, for a cluster YAML whose GPU nodes may be spot
(p4d spot in us-east-1 has run at about a third of on-demand; it moves by the hour and
zone, so this is an assumption, not a quote)."""

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster" / "aws.yaml"


@dataclass(frozen=True)
class CostEstimate:
    instance: str
    price_per_hour: float
    nodes: int
    run_hours: float
    run_cost: float
    cost_per_billion_tokens: float
    source: str
    spot_price_per_hour: float | None = None
    """The list price times SPOT_SHARE when the cluster YAML has spot nodes of this instance
    (None when it has none, or when the price was given)."""

    @property
    def spot_run_cost(self) -> float | None:
        return None if self.spot_price_per_hour is None else self.run_hours * self.nodes * self.spot_price_per_hour


def _gpu_node_configs(path: Path) -> list[dict]:
    """The node_config of each node type of the cluster YAML that has GPUs, in order."""
    if not path.is_file():
        return []
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PlanError(f"{path}: not valid YAML: {err}") from err
    return [node.get("node_config") or {} for node in (raw.get("available_node_types") or {}).values()
            if (node.get("resources") or {}).get("GPU")]


def cluster_instance(path: Path = CLUSTER_YAML) -> str | None:
    """The instance type of the cluster YAML's GPU worker nodes (the first that has GPUs)."""
    configs = _gpu_node_configs(path)
    return configs[0].get("InstanceType") if configs else None


def cluster_has_spot(instance: str, path: Path = CLUSTER_YAML) -> bool:
    """Whether the cluster YAML may launch ``instance`` on the spot market."""
    return any(c.get("InstanceType") == instance
               and (c.get("InstanceMarketOptions") or {}).get("MarketType") == "spot"
               for c in _gpu_node_configs(path))


def estimate_cost(cfg: Config, hw: Hardware, time: TimeEstimate, cluster_yaml: Path = CLUSTER_YAML,
                  price_per_hour: float | None = None) -> CostEstimate:
    """Run cost at the cluster YAML's instance when it carries this GPU, else at the
    instance that does."""
    instance = cluster_instance(cluster_yaml)
    source = f"{cluster_yaml.name} provisions {instance}"
    if instance is None or HARDWARE.get(hw.name, hw).instance != instance:
        source = (f"{hw.name} comes on {hw.instance}" +
                  (f" ({cluster_yaml.name} provisions {instance})" if instance else ""))
        instance = hw.instance
    spot = None
    if price_per_hour is None:
        if instance not in INSTANCE_PRICES:
            raise PlanError(f"no price known for {instance}: pass --price-per-hour")
        price_per_hour = INSTANCE_PRICES[instance]
        source += f", on-demand ${price_per_hour:.2f}/h (us-east-1 list price)"
        if cluster_has_spot(instance, cluster_yaml):
            spot = price_per_hour * SPOT_SHARE
            source += f"; its spot nodes about ${spot:.2f}/h ({SPOT_SHARE:.0%} of that, assumed)"
    else:
        source += f", ${price_per_hour:.2f}/h as given"
    nodes = math.ceil(cfg.parallel.max_workers / hw.gpus_per_node)
    tokens = cfg.train.total_tokens
    hours = tokens / time.tokens_per_second / 3600
    cost = hours * nodes * price_per_hour
    return CostEstimate(instance, price_per_hour, nodes, hours, cost, cost / (tokens / 1e9), source, spot)
