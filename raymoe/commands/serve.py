"""`raymoe serve` and `serve-stop`: a checkpoint behind an OpenAI-style HTTP API (Ray
Serve), its replicas expert-parallel inference groups."""

from __future__ import annotations

import argparse
import os
import sys
import time

from raymoe.commands import Subcommands
from raymoe.errors import RaymoeError
from raymoe.serve.app import APP_NAME


def cmd_serve(args: argparse.Namespace) -> None:
    from raymoe.serve import ServeOptions, serve_checkpoint

    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.detach and address is None:
        raise RaymoeError("--detach: needs --address or RAY_ADDRESS (a cluster that outlives this "
                          "command; a local one ends with it)")
    options = ServeOptions(ep=args.ep, replicas=args.replicas, cpus_per_rank=args.cpus_per_rank, device=args.device,
                           tokenizer=args.tokenizer, name=args.name, host=args.host, port=args.port,
                           route_prefix=args.route_prefix, max_batch_size=args.max_batch_size,
                           batch_wait_s=args.batch_wait, stream_tokens=args.stream_tokens, timeout_s=args.timeout,
                           app_name=args.app_name)
    served = serve_checkpoint(args.checkpoint, options, address=args.address)
    print(f"serving {served.model_id!r} at {served.url}\n\n"
          f"  curl {served.url}/v1/completions -H 'Content-Type: application/json' \\\n"
          f"    -d '{{\"prompt\": \"Once upon a time\", \"max_tokens\": 32, \"temperature\": 0}}'\n")
    if args.detach:
        print(f"left running; stop it with: raymoe serve-stop --address {address} --app-name {args.app_name}")
        return
    print("Ctrl-C stops it", file=sys.stderr)
    try:
        follow(args.app_name)
    except KeyboardInterrupt:
        print("stopping...", file=sys.stderr)
        served.shutdown()


def follow(app_name: str, every_s: float = 5.0) -> None:
    """Until interrupted or the application is deleted: a line whenever a deployment's
    replicas change (one died, one is starting in its place)."""
    from ray import serve

    last = ""
    while True:
        time.sleep(every_s)
        application = serve.status().applications.get(app_name)
        if application is None:
            raise RaymoeError(f"the application {app_name!r} was deleted")
        deployments = application.deployments
        line = "; ".join(f"{name}: {_word(d.status)} ({_counts(d.replica_states)})" for name, d in deployments.items())
        if line != last:
            print(line, file=sys.stderr)
            last = line


def _counts(states: dict) -> str:
    return ", ".join(f"{count} {_word(state)}" for state, count in states.items())


def _word(state: object) -> str:
    """A Serve status or replica state: an enum, or its value (Ray 2.60 gives replica states
    as strings)."""
    return str(getattr(state, "value", state))


def cmd_serve_stop(args: argparse.Namespace) -> None:
    from raymoe.console import connect_ray
    from raymoe.serve import stop_serving

    connect_ray(args.address)
    stop_serving(args.app_name)
    print(f"stopped {args.app_name!r}")


def add_commands(sub: Subcommands) -> None:
    serve = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-style HTTP API (Ray Serve)")
    serve.add_argument("checkpoint", help="checkpoint or run directory (local or s3://)")
    serve.add_argument("--ep", type=int, default=1,
                       help="Ray actors per replica, each holding the dense part and 1/N of the experts")
    serve.add_argument("--cpus-per-rank", type=float, default=1.0, help="CPUs of each of those actors")
    serve.add_argument("--replicas", type=int, default=1, help="inference groups serving requests (default 1)")
    serve.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per rank)")
    serve.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    serve.add_argument("--name", default=None, help="the model's id in the API (default: RUN/step-N)")
    serve.add_argument("--host", default="127.0.0.1", help="where HTTP listens (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--route-prefix", default="/",
                       help="the API's path under host:port (default /; another application may use another)")
    serve.add_argument("--max-batch-size", type=int, default=32,
                       help="prompts a replica generates together (1: no batching)")
    serve.add_argument("--batch-wait", type=float, default=0.01,
                       help="seconds a batch waits to fill before it runs")
    serve.add_argument("--stream-tokens", type=int, default=16, help="new tokens per step of a stream")
    serve.add_argument("--timeout", type=float, default=300.0,
                       help="seconds a prompt's answer may take; past it: HTTP 503, and the replica is replaced")
    serve.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    serve.add_argument("--detach", action="store_true",
                       help="return once serving, leaving it on the cluster (needs --address)")
    serve.add_argument("--app-name", default=APP_NAME, help="the Serve application's name")
    serve.set_defaults(func=cmd_serve)

    stop = sub.add_parser("serve-stop", help="stop an application that `raymoe serve --detach` left running")
    stop.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    stop.add_argument("--app-name", default=APP_NAME)
    stop.set_defaults(func=cmd_serve_stop)
