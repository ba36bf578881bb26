"""Serving a checkpoint: the Serve application (the HTTP deployment in front of
``replicas`` model replicas of ``ep`` actors each) started on the connected Ray
cluster, checked before anything starts and answering before it returns."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from raymoe.errors import RaymoeError

if TYPE_CHECKING:
    from ray.serve import Application

    from raymoe.serve.served_model import ServedModel

APP_NAME = "raymoe"


@dataclass(frozen=True)
class ServeOptions:
    ep: int = 1
    replicas: int = 1
    cpus_per_rank: float = 1.0
    device: str = "cpu"
    tokenizer: str | None = None
    name: str | None = None
    """The model's id (default: the checkpoint's RUN/step-N)."""
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    """Where the API lies under host:port (another application may serve another model)."""
    max_batch_size: int = 32
    """Rows a replica generates together; 1 turns batching off."""
    batch_wait_s: float = 0.01
    stream_tokens: int = 16
    timeout_s: float = 300.0
    """For a row's answer; past it the request is a 503 (and a hung replica is replaced)."""
    app_name: str = APP_NAME

    def __post_init__(self) -> None:
        checks = [("--max-batch-size", self.max_batch_size, self.max_batch_size >= 1, "at least 1"),
                  ("--stream-tokens", self.stream_tokens, self.stream_tokens >= 1, "at least 1"),
                  ("--batch-wait", self.batch_wait_s, self.batch_wait_s >= 0, "seconds >= 0"),
                  ("--timeout", self.timeout_s, self.timeout_s > 0, "seconds > 0"),
                  ("--port", self.port, 0 < self.port < 65536, "1 to 65535"),
                  ("--route-prefix", self.route_prefix, self.route_prefix.startswith("/"), "a path: /...")]
        for flag, value, ok, expected in checks:
            if not ok:
                raise RaymoeError(f"{flag} {value}: expected {expected}")


@dataclass(frozen=True)
class Served:
    """A running application; ``shutdown`` deletes it (the Ray cluster stays)."""

    url: str
    model_id: str
    app_name: str = APP_NAME

    def shutdown(self) -> None:
        stop_serving(self.app_name)


def serve_checkpoint(checkpoint: str, options: ServeOptions | None = None, address: str | None = None,
                     log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
                     **fields: Any) -> Served:
    """Serve ``checkpoint`` (a checkpoint or run directory, local or s3://) with
    ``options`` or ServeOptions' ``fields``; returns once the API answers. Uses the
    connected Ray cluster, else joins ``address`` (or RAY_ADDRESS), else starts a local one."""
    from raymoe.console import connect_ray
    from raymoe.infer.group import check_group_shape
    from raymoe.runs import checkpoint_manifest
    from raymoe.serve.served_model import ServedModel

    options = dataclasses.replace(options or ServeOptions(), **fields)
    manifest = checkpoint_manifest(checkpoint)
    check_group_shape(manifest, options.ep, options.replicas)  # before Ray
    served = ServedModel.from_manifest(manifest, options.name)
    import ray
    from ray import serve

    if not ray.is_initialized():
        connect_ray(address)
    _check_capacity(options)
    serve.start(http_options={"host": options.host, "port": options.port})
    log(f"serving {served.uri} as {served.id!r}: {options.replicas} replica(s) of {options.ep} Ray "
        f"actor(s) of {options.cpus_per_rank:g} CPU{' + 1 GPU' if options.device.startswith('cuda') else ''}, "
        f"loading...")
    start = time.monotonic()
    serve.run(build_app(served, options), name=options.app_name, route_prefix=options.route_prefix)
    url = f"http://{_reachable_host(options.host)}:{options.port}{options.route_prefix.rstrip('/')}"
    _wait_answering(url, served.id)
    log(f"ready in {time.monotonic() - start:.0f} s")
    return Served(url, served.id, options.app_name)


def build_app(served: ServedModel, options: ServeOptions) -> Application:
    """The Serve application: its ingress bound to the model's replicas."""
    from ray.serve import Deployment

    from raymoe.infer.group import GroupOptions
    from raymoe.serve.ingress import CompletionsServer, HttpOptions
    from raymoe.serve.replica import Batching, GroupReplica

    # serve.deployment made both classes Deployments, which their types do not show
    model, ingress = cast(Deployment, GroupReplica), cast(Deployment, CompletionsServer)
    group = GroupOptions(options.ep, 1, options.cpus_per_rank, options.device, options.tokenizer)
    batching = Batching(options.max_batch_size, options.batch_wait_s)
    replicas = model.options(num_replicas=options.replicas, max_ongoing_requests=2 * options.max_batch_size)
    http = HttpOptions(options.tokenizer, options.timeout_s, options.stream_tokens)
    return ingress.bind(replicas.bind(served.uri, served.seq_len, group, batching, options.timeout_s), served, http)


def stop_serving(app_name: str = APP_NAME) -> None:
    """Delete the application ``app_name`` from the connected cluster's Serve."""
    from ray import serve

    if app_name not in serve.status().applications:
        raise RaymoeError(f"no Serve application {app_name!r} on this cluster")
    serve.delete(app_name)


def _check_capacity(options: ServeOptions) -> None:
    """Every replica's actors fit the cluster, or it can grow (then the replicas wait)."""
    from raymoe.train.capacity import ClusterTooSmallError, WorkerGroupDemand, cluster_can_grow, node_resources

    gpus = 1.0 if options.device.startswith("cuda") else 0.0
    demand = WorkerGroupDemand(options.ep * options.replicas, options.cpus_per_rank, gpus)
    nodes = node_resources()
    if demand.placeable(nodes) < demand.workers and not cluster_can_grow():
        raise ClusterTooSmallError(f"{demand.describe(nodes)}: lower --replicas, --ep or --cpus-per-rank")


def _reachable_host(host: str) -> str:
    """The address clients use: this node's for a proxy on every interface."""
    import ray

    return ray.util.get_node_ip_address() if host in ("0.0.0.0", "::") else host


def _wait_answering(url: str, model_id: str, timeout_s: float = 30.0) -> None:
    """Until GET /v1/models names the model (the proxy learns the routes after the app runs)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as reply:
                ids = [m["id"] for m in json.load(reply)["data"]]
            if model_id in ids:
                return
            problem = f"it serves {ids}"
        except (OSError, ValueError, KeyError) as err:
            problem = str(err)
        if time.monotonic() > deadline:
            raise RaymoeError(f"{url}/v1/models does not answer with {model_id!r} after {timeout_s:g} s "
                              f"({problem}); is Serve already running on this cluster with another "
                              "--host or --port?")
        time.sleep(0.2)
