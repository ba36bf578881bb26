"""Data + expert parallelism on real gloo process groups: an N-rank step equals the
1-process step on the same global batch, at every EP size, with and without dropping;
with dropping, the fixed-capacity exchange gives the same step as the variable one; and
the host syncs of a step through the real exchange stay at one per step (plus one per
MoE layer and micro-batch without dropping). Activation checkpointing recomputes a block
without exchanging its rows again: the same exchanges per micro-batch, the same gradients."""

from __future__ import annotations

import dataclasses
from collections import Counter
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from multiproc import run_distributed

from raymoe.config import load_config
from raymoe.host_syncs import count_host_syncs
from raymoe.model import GPT, LocalExchange
from raymoe.model.dispatch import GroupAgreement
from raymoe.model.exchange_tape import keep_exchanges, taped
from raymoe.model.moe import MoELayer
from raymoe.parallel import Mesh, MeshLayout
from raymoe.parallel.exchange import ProcessGroupExchange
from raymoe.parallel.shared_memory import SharedMemoryAllToAll
from raymoe.train.optim import build_optimizer
from raymoe.train.step import train_step

GLOBAL_BATCH = 8  # sequences, split evenly over the ranks


MOE_LAYERS = 2


def tiny_config(drop_tokens: bool, fixed_exchange: bool = True, checkpointing: bool = False):
    return load_config("tiny-moe8", [
        f"model.activation_checkpointing={str(checkpointing).lower()}",
        "model.seq_len=16", f"model.n_layer={MOE_LAYERS}", "model.d_model=32", "model.moe.every=1",
        "model.moe.use_rts=false", f"model.moe.drop_tokens={str(drop_tokens).lower()}",
        f"model.moe.fixed_capacity_exchange={str(fixed_exchange).lower()}",
        "model.moe.min_capacity=1", "model.moe.bias_update_rate=0.1", "optim.lr=1e-2",
        "optim.grad_clip=0.05"])


def global_batch(cfg, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.model.vocab_size, (GLOBAL_BATCH, cfg.model.seq_len + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def shards(batch, parts: int):
    inputs, targets = batch
    return list(zip(inputs.chunk(parts), targets.chunk(parts), strict=False))


def build(cfg, mesh: Mesh):
    torch.manual_seed(0)
    model = GPT(cfg.model, mesh.expert_exchange())
    return model, build_optimizer(model, cfg.optim)


def local_params(model: GPT) -> dict[str, torch.Tensor]:
    """Parameters, and the routers' balancing biases (updated from the step's loads)."""
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def one_step_worker(rank: int, world: int, ep_sizes: list[int]) -> dict:
    """Keys (ep, drop) for the default exchange, (ep, "variable") for dropping with the
    variable-split exchange."""
    results = {}
    for ep in ep_sizes:
        for key, cfg in (((ep, True), tiny_config(True)), ((ep, False), tiny_config(False)),
                         ((ep, "variable"), tiny_config(True, fixed_exchange=False))):
            mesh = Mesh(ep)
            model, opt = build(cfg, mesh)
            with count_host_syncs(excluding=opt) as synced:
                step = train_step(model, opt, mesh, [shards(global_batch(cfg, 1), world)[rank]],
                                  cfg.optim.grad_clip)
            results[key] = {"step": step, "params": local_params(model), "syncs": synced.total,
                            "experts": list(mesh.global_expert_ids(cfg.model.moe.num_experts))}
    return results


def reference_step(drop: bool, ranks: int):
    cfg = tiny_config(drop)
    mesh = Mesh(1)
    model, opt = build(cfg, mesh)
    step = train_step(model, opt, mesh, shards(global_batch(cfg, 1), ranks), cfg.optim.grad_clip)
    return step, local_params(model)


def assert_matches_reference(results: list[dict], ep: int, drop: bool) -> None:
    ref_step, ref_params = reference_step(drop, len(results))
    assert ref_step.grad_norm > 0.05, "the clip must be active for this test to mean anything"
    biases = [v for n, v in ref_params.items() if n.endswith("balance_bias")]
    assert len(biases) == MOE_LAYERS and all(b.abs().sum() > 0 for b in biases), "no balancing update"
    for rank_result in results:
        got = rank_result[(ep, drop)]
        assert got["step"].loss == pytest.approx(ref_step.loss, abs=1e-5)
        assert got["step"].grad_norm == pytest.approx(ref_step.grad_norm, rel=1e-5)
        ids = got["experts"]
        for name, value in got["params"].items():
            expected = ref_params[name][ids[0]:ids[-1] + 1] if ".experts." in name else ref_params[name]
            assert torch.allclose(value, expected, atol=1e-5), (ep, drop, name)


def assert_fixed_exchange_equals_variable(results: list[dict], ep: int) -> None:
    for rank_result in results:
        fixed, variable = rank_result[(ep, True)], rank_result[(ep, "variable")]
        assert fixed["step"].loss == pytest.approx(variable["step"].loss, abs=1e-6)
        assert fixed["step"].grad_norm == pytest.approx(variable["step"].grad_norm, abs=1e-6)
        assert fixed["step"].dropped_fraction == variable["step"].dropped_fraction
        assert max(fixed["step"].dropped_fraction) > 0, "the test must drop tokens"
        for name, value in fixed["params"].items():
            assert torch.allclose(value, variable["params"][name], rtol=0, atol=1e-6), (ep, name)


def assert_syncs(results: list[dict], ep: int) -> None:
    """One micro-batch: the step's read, plus one read of the exchanged counts per MoE
    layer where the exchange needs them."""
    for rank_result in results:
        assert rank_result[(ep, True)]["syncs"] == 1
        assert rank_result[(ep, False)]["syncs"] == 1 + MOE_LAYERS
        assert rank_result[(ep, "variable")]["syncs"] == 1 + MOE_LAYERS


def test_world_2_with_ep_2_and_ep_1_equals_one_process(tmp_path):
    results = run_distributed(one_step_worker, 2, tmp_path, [2, 1])
    for ep in (2, 1):
        for drop in (True, False):
            assert_matches_reference(results, ep, drop)
        assert_fixed_exchange_equals_variable(results, ep)
        assert_syncs(results, ep)


@pytest.mark.slow  # 4 processes: minutes on 2 cores
def test_world_4_with_ep_2_and_ep_4_equals_one_process(tmp_path):
    results = run_distributed(one_step_worker, 4, tmp_path, [2, 4])
    for ep in (2, 4):
        for drop in (True, False):
            assert_matches_reference(results, ep, drop)
        assert_fixed_exchange_equals_variable(results, ep)
        assert_syncs(results, ep)


def counting(calls: Counter, method: str):
    """``ProcessGroupExchange.<method>``, counting its calls in ``calls``."""
    original = getattr(ProcessGroupExchange, method)

    def counted(self, *args):
        calls[method] += 1
        return original(self, *args)
    return mock.patch.object(ProcessGroupExchange, method, counted)


def checkpointing_worker(rank: int, world: int) -> dict:
    """At EP 2, per (fixed exchange, checkpointing) and backward pass (the second through
    the retained graph): the row and count exchanges since the forward, and the gradients."""
    calls: Counter = Counter()
    results = {}
    with counting(calls, "exchange_rows"), counting(calls, "exchange_counts"):
        for fixed in (True, False):
            for checkpointing in (False, True):
                cfg = tiny_config(True, fixed, checkpointing)
                model, _ = build(cfg, Mesh(world))
                calls.clear()
                inputs, targets = shards(global_batch(cfg, 1), world)[rank]
                loss = model(inputs, targets).loss
                for again in (False, True):
                    loss.backward(retain_graph=not again)
                    results[fixed, checkpointing, again] = {
                        "exchanges": dict(calls),
                        "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    return results


def test_checkpointing_repeats_no_exchange_and_keeps_the_gradients(tmp_path):
    results = run_distributed(checkpointing_worker, 2, tmp_path)
    for rank_result in results:
        for fixed in (True, False):
            # dispatch and combine forward, their gradients back; the variable path's counts once
            once = {"exchange_rows": 4 * MOE_LAYERS} | ({} if fixed else {"exchange_counts": MOE_LAYERS})
            assert rank_result[fixed, False, False]["exchanges"] == once
            assert rank_result[fixed, True, False]["exchanges"] == once, fixed
            # a second backward finds the tape spent: its recomputation exchanges again
            again = rank_result[fixed, True, True]["exchanges"]
            assert again == {name: 2 * count for name, count in once.items()}, fixed
            for backward_again in (False, True):
                plain, checkpointed = (rank_result[fixed, checkpointing, backward_again]["grads"]
                                       for checkpointing in (False, True))
                for name, grad in plain.items():
                    assert torch.allclose(checkpointed[name], grad, rtol=0, atol=1e-6), (fixed, backward_again, name)


class FlipExchange:
    """Two ranks in one process: the rows come back in reverse order, a permutation whose
    gradient goes back by the same flip. Counts its row exchanges."""

    ep_size, ep_rank = 2, 0

    def __init__(self):
        self.calls = 0
        self.agreement = GroupAgreement()

    def all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        self.calls += 1
        return x.flip(0)


def test_a_replayed_exchange_returns_the_recorded_rows_and_sends_gradients_back():
    exchange = FlipExchange()
    assert taped(exchange) is exchange  # outside a checkpointed region
    recording, replaying = keep_exchanges()
    with recording:
        local = LocalExchange()
        assert taped(local) is local  # nothing to keep within one process
        x = torch.randn(4, 3, requires_grad=True)
        live = taped(exchange).all_to_all(x * 2, [2, 2], [2, 2])
    with replaying:
        replayed = taped(exchange).all_to_all(x * 2, [2, 2], [2, 2])
    assert exchange.calls == 1 and torch.equal(replayed, live)
    weights = torch.randn(4, 3)
    grad_live, = torch.autograd.grad((live * weights).sum(), x)
    grad_replayed, = torch.autograd.grad((replayed * weights).sum(), x)
    assert torch.equal(grad_replayed, grad_live)
    assert exchange.calls == 2  # the replayed rows' gradient went back through the exchange
    with replaying:  # the tape is spent: exchanged live
        assert torch.equal(taped(exchange).all_to_all(x, [2, 2], [2, 2]), x.flip(0))
    assert exchange.calls == 3


def test_mesh_layout_groups():
    layout = MeshLayout(world_size=8, ep_size=4)
    assert layout.ep_groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.expert_dp_groups == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert list(layout.global_expert_ids(6, 128)) == list(range(64, 96))
    with pytest.raises(ValueError, match="expert-parallel size 3 must divide the world size 8"):
        MeshLayout(8, 3)


def test_ep_size_1_needs_no_process_group():
    mesh = Mesh(1)
    assert not mesh.is_distributed and mesh.ep_group is None
    assert type(mesh.expert_exchange()).__name__ == "LocalExchange"


def test_initialisation_does_not_depend_on_the_ep_size():
    cfg = tiny_config(True)
    full, _ = build(cfg, Mesh(1))
    layout = MeshLayout(4, 4)

    class FakeExchange:  # the rank-2 slice without a process group: only its ids matter
        ep_size, ep_rank = 4, 2

    torch.manual_seed(0)
    sharded = GPT(cfg.model, FakeExchange())
    ids = layout.global_expert_ids(2, cfg.model.moe.num_experts)
    for (name, a), (_, b) in zip(full.named_parameters(), sharded.named_parameters(), strict=False):
        expected = a[ids.start:ids.stop] if ".experts." in name else a
        assert torch.equal(expected, b), name


BLOCK_SCHEDULE = [  # rank 0's tokens per forward, and every other rank's
    (5, 3), (5, 3),  # counts first, then blocks of the size the first agreed
    (9, 2),  # rank 0 overflows: headers only, then blocks of 9 x top-k
    (1, 0), (0, 0),  # blocks shrink to what the last forward needed
    (30_000, 1),  # past BLOCK_EXCHANGE_BYTES: headers only, then counts
]
def block_exchange_worker(rank: int, world: int, top_k: int, dtype: torch.dtype, shared: bool,
                          d_model: int) -> list[dict]:
    """Per forward of BLOCK_SCHEDULE (no gradient, eval), on an MoE layer of EP ``world``:
    the output against one process's layer on the same tokens, the exchanges made, and the
    block size agreed after it. ``shared``: the small exchanges through shared memory;
    ``dtype``: bf16 by autocast, fp64 by the layer's own."""
    cfg = dataclasses.replace(load_config("tiny-moe8").model.moe, top_k=top_k, num_experts=8,
                              noisy_gate_policy=None)
    torch.manual_seed(0)
    one_process = MoELayer(d_model, 4 * d_model, cfg).eval()
    for p in one_process.parameters():
        torch.nn.init.normal_(p, std=0.5)
    exchange = ProcessGroupExchange(dist.group.WORLD, world, rank)
    exchange.shared = SharedMemoryAllToAll.connect(dist.group.WORLD) if shared else None
    layer = MoELayer(d_model, 4 * d_model, cfg, exchange).eval()
    if dtype == torch.float64:
        one_process, layer = one_process.double(), layer.double()
    experts = slice(rank * layer.num_local_experts, (rank + 1) * layer.num_local_experts)
    with torch.no_grad():
        layer.router.weight.copy_(one_process.router.weight)
        for name, p in layer.experts.named_parameters():
            p.copy_(getattr(one_process.experts, name)[experts])
    calls: Counter = Counter()
    results = []
    with (counting(calls, "exchange_rows"), counting(calls, "exchange_counts"),
          counting(calls, "exchange_blocks"), torch.no_grad(),
          torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)):
        for step, planned in enumerate(BLOCK_SCHEDULE):
            tokens = planned[min(rank, 1)]
            x = torch.randn(tokens, d_model, generator=torch.Generator().manual_seed(100 * step + rank))
            x = x.double() if dtype == torch.float64 else x
            calls.clear()
            got = layer(x)[0]
            results.append({"error": (got - one_process(x)[0]).abs().max().item() if tokens else 0.0,
                            "exchanges": dict(calls), "block_rows": exchange.agreement.block_rows})
    return results


@pytest.mark.parametrize("world, top_k, dtype, shared, d_model", [
    (2, 1, torch.float32, False, 32), (4, 2, torch.float32, False, 32), (2, 1, torch.bfloat16, False, 32),
    (4, 2, torch.float32, True, 32), (2, 1, torch.bfloat16, True, 32),
    (2, 2, torch.bfloat16, True, 5), (2, 1, torch.float64, False, 7)])  # a row padded to 8 bytes
def test_block_exchange_equals_one_process_and_saves_the_count_exchange(tmp_path, world, top_k, dtype, shared,
                                                                        d_model):
    results = run_distributed(block_exchange_worker, world, tmp_path, top_k, dtype, shared, d_model)
    counted, blocks = {"exchange_counts": 1, "exchange_rows": 2}, {"exchange_blocks": 2}
    header_only = {"exchange_blocks": 1}
    expected = [
        (counted, 5 * top_k), (blocks, 5 * top_k),
        ({"exchange_blocks": 3}, 9 * top_k),
        (blocks, top_k), (blocks, 0),
        ({**header_only, **counted}, None)]
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for rank_results in results:
        assert len(rank_results) == len(expected)
        for step, (got, (exchanges, block_rows)) in enumerate(zip(rank_results, expected, strict=True)):
            assert got["error"] < tolerance, (step, got)
            assert got["exchanges"] == exchanges, step
            assert got["block_rows"] == block_rows, step


def out_of_step_worker(rank: int, world: int, aligned_first: bool) -> str:
    """Rank 0 in the MoE layer of block 0, rank 1 in block 1's: after an aligned forward
    (``aligned_first``: the block exchange) or first thing (the count exchange)."""
    cfg = dataclasses.replace(load_config("tiny-moe8").model.moe, num_experts=4)
    exchange = ProcessGroupExchange(dist.group.WORLD, world, rank)
    layers = [MoELayer(8, 16, cfg, exchange, layer=index).eval() for index in (0, 1)]
    with torch.no_grad():
        if aligned_first:
            layers[0](torch.randn(3, 8))
            assert exchange.agreement.block_rows == 3
        try:
            layers[rank](torch.randn(3, 8))
        except RuntimeError as e:
            return str(e)
    return "no error"


@pytest.mark.parametrize("aligned_first", [False, True])
def test_ranks_in_different_layers_fail_alike_instead_of_exchanging(tmp_path, aligned_first):
    for error in run_distributed(out_of_step_worker, 2, tmp_path, aligned_first):
        assert "out of step: the group's ranks are in the MoE layers of blocks [0, 1]" in error
