"""Sharded data parallelism (FSDP2) with expert parallelism on real gloo process groups:
a model built on meta and sharded starts from the one-process model's exact values; a
sharded step equals the one-process step on the same global batch (loss, gradient norm,
every updated parameter) at several (world, EP) sizes, with and without dropped tokens,
clipping active, with gradient accumulation (gradients reduce-scattered once per step or
after every micro-batch), with and without activation checkpointing; and each rank holds
about 1/N of the parameters and optimizer states."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.distributed as dist
from multiproc import run_distributed
from test_expert_parallel import build, global_batch, shards, tiny_config
from torch.distributed.fsdp import FSDPModule

from raymoe.config import load_config
from raymoe.model import GPT
from raymoe.model.moe import Experts
from raymoe.parallel import Mesh
from raymoe.parallel.build import build_model
from raymoe.parallel.shard import is_sharded
from raymoe.train.optim import build_optimizer
from raymoe.train.step import train_step

ACCUMULATION = 2  # micro-batches per rank and step


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole (experts: this EP rank's block); collective."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def local_bytes(model, opt) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) this rank holds."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t
    params = sum(local(p).nbytes for p in model.parameters())
    states = sum(local(v).nbytes for p in model.parameters() for v in opt.state[p].values()
                 if v.ndim > 0)
    return params, states


def sharded_steps_worker(rank: int, world: int, ep_sizes: list[int], checkpointing: bool,
                         sync_every: bool) -> dict:
    """Per (ep, drop): the step, parameters before and after it, the rank's bytes, its
    reduce-scatters and FSDP units that have one; and "uneven": the initial parameters
    of a model whose experts FSDP splits by rows."""
    results: dict = {}
    for ep in ep_sizes:
        mesh = Mesh(ep)
        for drop in (True, False):
            cfg = tiny_config(drop)
            cfg.model.activation_checkpointing = checkpointing
            cfg.parallel.shard = "fsdp"
            torch.manual_seed(0)
            model = build_model(cfg, mesh, torch.device("cpu"))  # on meta, then the local parts
            assert is_sharded(model)
            initial = full_params(model)
            opt = build_optimizer(model, cfg.optim)
            mine = shards(global_batch(cfg, 1), world * ACCUMULATION)[rank * ACCUMULATION:
                                                                      (rank + 1) * ACCUMULATION]
            with mock.patch.object(dist, "reduce_scatter_single", wraps=dist.reduce_scatter_single) as rs:
                step = train_step(model, opt, mesh, mine, cfg.optim.grad_clip,
                                  sync_every_micro_batch=sync_every)
            units = sum(isinstance(m, FSDPModule) and (mesh.edp_size > 1 or not isinstance(m, Experts))
                        for m in model.modules())  # a one-rank group has nothing to reduce
            results[(ep, drop)] = {"step": step, "initial": initial, "params": full_params(model),
                                   "experts": list(mesh.global_expert_ids(cfg.model.moe.num_experts)),
                                   "bytes": local_bytes(model, opt),
                                   "reduce_scatters": rs.call_count, "units": units}
    uneven = uneven_config(world)
    uneven.parallel.shard = "fsdp"
    torch.manual_seed(0)
    results["uneven"] = full_params(build_model(uneven, Mesh(1), torch.device("cpu")))
    return results


def uneven_config(world: int):
    """More ranks than experts per rank: FSDP shards each expert's rows."""
    return load_config("tiny-moe8", ["model.seq_len=16", "model.n_layer=2", "model.d_model=32",
                                     f"model.moe.num_experts={world + 1}"])


def reference(drop: bool, micro_batches: int):
    cfg = tiny_config(drop)
    mesh = Mesh(1)
    model, opt = build(cfg, mesh)
    initial = full_params(model)
    step = train_step(model, opt, mesh, shards(global_batch(cfg, 1), micro_batches), cfg.optim.grad_clip)
    return step, initial, full_params(model), local_bytes(model, opt)


def _experts_of(params: dict[str, torch.Tensor], ids: list[int]) -> dict[str, torch.Tensor]:
    return {n: p[ids[0]:ids[-1] + 1] if ".experts." in n else p for n, p in params.items()}


def assert_sharded_matches_reference(results: list[dict], ep: int, sync_every: bool) -> None:
    world = len(results)
    for drop in (True, False):
        ref_step, ref_initial, ref_params, (ref_param_bytes, ref_state_bytes) = reference(
            drop, world * ACCUMULATION)
        assert ref_step.grad_norm > 0.05, "the clip must be active for this test to mean anything"
        assert not drop or max(ref_step.dropped_fraction) > 0, "some tokens must be dropped"
        for got in (r[(ep, drop)] for r in results):
            assert got["step"].loss == pytest.approx(ref_step.loss, abs=1e-5)
            assert got["step"].grad_norm == pytest.approx(ref_step.grad_norm, rel=1e-5)
            ids = got["experts"]
            for name, value in _experts_of(ref_initial, ids).items():  # built on meta: the same bits
                assert torch.equal(got["initial"][name], value), (world, ep, drop, name)
            for name, expected in _experts_of(ref_params, ids).items():
                assert torch.allclose(got["params"][name], expected, atol=1e-5), (world, ep, drop, name)
            assert got["reduce_scatters"] == got["units"] * (ACCUMULATION if sync_every else 1)
            param_bytes, state_bytes = got["bytes"]  # 1/N of the whole model, up to padding
            assert param_bytes == pytest.approx(ref_param_bytes / world, rel=0.05)
            assert state_bytes == pytest.approx(ref_state_bytes / world, rel=0.05)


def assert_uneven_experts_initialised_as_one_process(results: list[dict]) -> None:
    torch.manual_seed(0)
    whole = full_params(GPT(uneven_config(len(results)).model))
    for got in results:
        assert got["uneven"].keys() == whole.keys()
        for name, value in whole.items():
            assert torch.equal(got["uneven"][name], value), name


def test_sharded_step_with_activation_checkpointing_equals_one_process_at_world_2(tmp_path):
    results = run_distributed(sharded_steps_worker, 2, tmp_path, [1, 2], True, False)
    for ep in (1, 2):
        assert_sharded_matches_reference(results, ep, sync_every=False)
    assert_uneven_experts_initialised_as_one_process(results)


@pytest.mark.slow  # 4 processes: minutes on 2 cores
def test_sharded_step_equals_one_process_at_world_4_ep_2_and_4(tmp_path):
    results = run_distributed(sharded_steps_worker, 4, tmp_path, [2, 4], False, True)
    for ep in (2, 4):
        assert_sharded_matches_reference(results, ep, sync_every=True)
    assert_uneven_experts_initialised_as_one_process(results)


def test_reference_presets_shard_and_checkpoint_activations_the_tiny_ones_do_not():
    for name in ("gpt-350m", "gpt-1.3b", "gpt-6.7b", "gpt-350m-moe128", "gpt-1.3b-moe128"):
        cfg = load_config(name)
        assert cfg.parallel.shard == "fsdp" and cfg.model.activation_checkpointing, name
    for name in ("tiny", "tiny-moe8"):
        cfg = load_config(name)
        assert cfg.parallel.shard == "none" and not cfg.model.activation_checkpointing, name
