"""train.precision: which dtype auto, fp32 and bf16 pick on each device; a bf16 training
step against the fp32 one; routers and the loss's log-softmax in fp32 under bf16; and
FSDP's bf16 gathers with fp32 reductions on 2 gloo ranks against one bf16 process.

bf16 keeps 8 significant bits: each rounding errs by at most 2^-8 relative (the spacing,
twice the round-to-nearest bound). A matrix product under autocast rounds its two
operands and its output (accumulation is fp32): 3 roundings. Along the forward path a
block has 6 products in series (qkv, QK^T, AV, proj, and the FFN's two), the head one;
backward mirrors them. Rounding errors of independent sign add as a random walk
(Higham and Mary, 2019), so the loss and the gradient norm agree to
2^-8 * sqrt(2 * 3 * (6 * n_layer + 1)) relative: 0.035 at these 2 layers (seen: 1e-5 on
the loss, 1.3e-3 on the gradient norm)."""

from __future__ import annotations

import math
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiproc import run_distributed
from test_expert_parallel import MOE_LAYERS, build, global_batch, shards, tiny_config

from raymoe.config import ConfigError, load_config
from raymoe.model import GPT, precision
from raymoe.model.moe import Router
from raymoe.model.precision import CPU_BF16_MIN_D_MODEL, autocast_dtype, autocast_to, cast_for_inference
from raymoe.parallel import Mesh
from raymoe.parallel.build import build_model
from raymoe.train.optim import build_optimizer
from raymoe.train.step import StepResult, train_step

BF16_RTOL = 2**-8 * math.sqrt(2 * 3 * (6 * MOE_LAYERS + 1))
MICRO_BATCHES = 4
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_precision_key_is_validated():
    with pytest.raises(ConfigError, match=r"train\.precision: 'fp16' is not one of"):
        load_config("tiny", ["train.precision=fp16"])
    assert load_config("tiny").train.precision == "auto"


@pytest.mark.parametrize("native", [True, False])
def test_auto_takes_bf16_on_gpu_and_on_cpu_only_natively_and_wide(native):
    with mock.patch.object(precision, "cpu_has_native_bf16", return_value=native):
        assert autocast_dtype(CUDA, "auto") is torch.bfloat16
        assert autocast_dtype(CUDA, "bf16") is torch.bfloat16
        assert autocast_dtype(CUDA, "fp32") is None
        assert autocast_dtype(CPU, "fp32", d_model=4096) is None
        assert autocast_dtype(CPU, "auto", d_model=CPU_BF16_MIN_D_MODEL - 1) is None
        wide = autocast_dtype(CPU, "auto", d_model=CPU_BF16_MIN_D_MODEL)
        assert wide is (torch.bfloat16 if native else None)
        if native:
            assert autocast_dtype(CPU, "bf16", d_model=32) is torch.bfloat16
        else:
            with pytest.raises(ConfigError, match=r"train\.precision: bf16 needs a CPU with native bf16"):
                autocast_dtype(CPU, "bf16")


@pytest.mark.parametrize(("cpuinfo", "native"), [
    ("processor : 0\nflags : fpu avx512f avx512bw\n", False),  # AVX-512 alone emulates bf16
    ("processor : 0\nflags : fpu avx512f avx512_bf16\n", True),
    ("processor : 0\nflags : fpu amx_tile amx_bf16\n", True),
    ("processor : 0\nFeatures : fp asimd sve bf16\n", True),  # Arm
])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    precision.cpu_has_native_bf16.cache_clear()
    try:
        with mock.patch.object(Path, "read_text", return_value=cpuinfo):
            assert precision.cpu_has_native_bf16() is native
    finally:
        precision.cpu_has_native_bf16.cache_clear()


def one_process_step(dtype: torch.dtype | None) -> StepResult:
    cfg = tiny_config(drop_tokens=True)
    model, opt = build(cfg, Mesh(1))
    return train_step(model, opt, Mesh(1), shards(global_batch(cfg, 1), MICRO_BATCHES),
                      cfg.optim.grad_clip, dtype)


def assert_close_in_bf16(got: StepResult, expected: StepResult) -> None:
    assert not got.skipped
    for key in ("loss", "lm_loss", "grad_norm"):
        assert getattr(got, key) == pytest.approx(getattr(expected, key), rel=BF16_RTOL), key
    assert got.l_aux == pytest.approx(expected.l_aux, rel=BF16_RTOL, abs=BF16_RTOL)


def test_bf16_step_matches_fp32_within_bf16_rounding():
    fp32, bf16 = one_process_step(None), one_process_step(torch.bfloat16)
    assert_close_in_bf16(bf16, fp32)
    assert bf16.grad_norm != fp32.grad_norm, "bf16 must actually have run"


def record_dtypes(model: GPT) -> dict[str, list[torch.dtype]]:
    """Hooks noting, at every forward, the dtypes of the routers' outputs and of the
    first attention's weight (as FSDP gathered it) and output."""
    seen: dict[str, list[torch.dtype]] = {"router": [], "attention weight": [], "attention": []}
    for router in (m for m in model.modules() if isinstance(m, Router)):
        router.register_forward_hook(lambda _m, _i, out: seen["router"].append(out.dtype))
    qkv = model.blocks[0].attn.qkv
    qkv.register_forward_pre_hook(lambda m, _i: seen["attention weight"].append(m.weight.dtype))
    qkv.register_forward_hook(lambda _m, _i, out: seen["attention"].append(out.dtype))
    return seen


def test_routers_and_loss_stay_fp32_under_bf16():
    cfg = tiny_config(drop_tokens=True)
    model, _ = build(cfg, Mesh(1))
    seen = record_dtypes(model)
    inputs, targets = global_batch(cfg, 1)
    with mock.patch.object(F, "cross_entropy", wraps=F.cross_entropy) as cross_entropy, \
            autocast_to(CPU, torch.bfloat16):
        out = model(inputs, targets)
    assert out.logits.dtype == torch.bfloat16 and seen["attention"] == [torch.bfloat16]  # autocast is on
    assert seen["router"] == [torch.float32] * MOE_LAYERS
    assert cross_entropy.call_args.args[0].dtype == torch.float32
    assert out.lm_loss.dtype == out.loss.dtype == torch.float32


def fsdp_bf16_worker(rank: int, world: int) -> dict:
    cfg = tiny_config(drop_tokens=True)
    cfg.parallel.shard = "fsdp"
    cfg.train.precision = "bf16"
    mesh = Mesh(1)
    with mock.patch.object(precision, "cpu_has_native_bf16", return_value=True):  # any CPU computes it
        torch.manual_seed(0)
        model = build_model(cfg, mesh, CPU)
    seen = record_dtypes(model)
    per_rank = MICRO_BATCHES // world
    mine = shards(global_batch(cfg, 1), MICRO_BATCHES)[rank * per_rank:(rank + 1) * per_rank]
    with mock.patch.object(dist, "reduce_scatter_single", wraps=dist.reduce_scatter_single) as rs:
        step = train_step(model, build_optimizer(model, cfg.optim), mesh, mine, cfg.optim.grad_clip,
                          torch.bfloat16)
    return {"step": step, "seen": seen, "reduce_dtypes": {c.kwargs["input"].dtype for c in rs.call_args_list}}


def test_fsdp_gathers_bf16_and_reduces_fp32_on_gloo_as_one_bf16_process(tmp_path):
    results = run_distributed(fsdp_bf16_worker, 2, tmp_path)
    expected = one_process_step(torch.bfloat16)
    for got in results:
        assert_close_in_bf16(got["step"], expected)
        assert set(got["seen"]["attention weight"]) == {torch.bfloat16}  # FSDP gathered bf16
        assert set(got["seen"]["router"]) == {torch.float32}
        assert got["reduce_dtypes"] == {torch.float32}


def test_inference_weights_stored_in_bf16_give_autocasts_numbers():
    """GPU inference stores the weights autocast would cast (linear layers, experts) in
    bf16 once: the same logits, to the bit, as casting them at every use; embeddings,
    norms and routers stay fp32."""
    cfg = load_config("tiny-moe8", ["model.d_model=64", "model.n_layer=2", "model.moe.every=1"])
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (3, 17))
    with torch.no_grad(), autocast_to(torch.device("cpu"), torch.bfloat16):
        expected = model(ids).logits
        cast_for_inference(model, torch.bfloat16)
        got = model(ids).logits
    assert torch.equal(got, expected)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["blocks.0.mlp.experts.w_in"] == dtypes["blocks.0.attn.qkv.weight"] == torch.bfloat16
    assert dtypes["blocks.0.mlp.router.weight"] == dtypes["wte.weight"] == dtypes["ln_f.weight"] == torch.float32
