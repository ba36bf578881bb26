"""One prepared run for a machine with one GPU (under 8 minutes): what the CPU cannot say.

- training throughput and MFU of gpt-350m and gpt-350m-moe128 (fewer layers where
  `raymoe plan` says the full depth does not fit), bf16 autocast, one process, with the
  peak memory the step allocated against the plan's estimate, and its host syncs
  (counted by raymoe.host_syncs and, on CUDA, by torch's own sync-debug mode);
- the MoE layer (128 experts) against a dense FFN of the same active size;
- the expert FFN as one ``torch._grouped_mm`` over the kept rows against the batched
  product over capacity-padded buffers that raymoe uses, where the GPU has grouped GEMMs
  (CUDA sm90+, bf16).

Without CUDA the rows that need a GPU print "no GPU"; ``--smoke`` runs everything else at
a tiny shape on the CPU (the test suite does), so the script stays in working order.

    python bench/gpu.py [--smoke] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymoe.config import MoEConfig, load_config  # noqa: E402
from raymoe.host_syncs import count_host_syncs  # noqa: E402
from raymoe.model import GPT  # noqa: E402
from raymoe.model.moe import Experts, MoELayer  # noqa: E402
from raymoe.parallel import Mesh  # noqa: E402
from raymoe.plan import device_hardware, estimate_memory  # noqa: E402
from raymoe.train.metrics import model_flops_per_token, peak_flops  # noqa: E402
from raymoe.train.optim import build_optimizer  # noqa: E402
from raymoe.train.step import train_step  # noqa: E402

NO_GPU = "no GPU"
ONE_GPU = ["parallel.num_workers=1", "parallel.ep_size=1"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------ training throughput

def planned_hardware(device: torch.device):
    if device.type != "cuda":
        return "cpu"
    return device_hardware(torch.cuda.get_device_name(device),
                           torch.cuda.get_device_properties(device).total_memory)


def layers_that_fit(preset: str, overrides: list[str], device: torch.device) -> int:
    """The preset's depth, or the largest even depth that `raymoe plan` says fits."""
    cfg = load_config(preset, overrides)
    if device.type != "cuda":
        return cfg.model.n_layer
    for n_layer in range(cfg.model.n_layer, 0, -2):
        cfg.model.n_layer = n_layer
        if estimate_memory(cfg, planned_hardware(device)).fits:
            return n_layer
    raise SystemExit(f"{preset}: not even 2 layers fit on {torch.cuda.get_device_name(device)}")


def cuda_syncs(device: torch.device, fn: Callable[[], object]) -> int | None:
    """Syncs that torch's CUDA sync-debug mode reports while ``fn`` runs."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def training_row(preset: str, overrides: list[str], device: torch.device, steps: int) -> str:
    overrides = ONE_GPU + overrides
    n_layer = layers_that_fit(preset, overrides, device)
    cfg = load_config(preset, overrides + [f"model.n_layer={n_layer}"])
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    t = cfg.train
    data = torch.randint(0, cfg.model.vocab_size, (t.micro_batch, cfg.model.seq_len + 1), device=device)
    batches = [(data[:, :-1], data[:, 1:])]
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step() -> None:
        train_step(model, optimizer, Mesh(1), batches, cfg.optim.grad_clip, dtype)

    step()
    with count_host_syncs(device, excluding=optimizer) as syncs:
        step()
    reported = cuda_syncs(device, step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, steps, warmup=0)
    tokens_per_s = t.micro_batch * cfg.model.seq_len / seconds
    peak = peak_flops(device, 0.0)
    mfu = f"MFU {model_flops_per_token(model) * tokens_per_s / peak:.1%}" if peak else f"MFU: {NO_GPU}"
    planned = estimate_memory(cfg, planned_hardware(device)).peak
    measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    memory = (f"peak memory {measured / 2**30:.1f} GiB, raymoe plan {planned / 2**30:.1f} GiB "
              f"(measured / plan {measured / planned:.2f})" if measured is not None
              else f"peak memory: {NO_GPU} (raymoe plan on cpu: {planned / 2**30:.3f} GiB)")
    cuda_count = f" (CUDA sync debug: {reported})" if reported is not None else ""
    return (f"{preset}: {n_layer} layers, {model.num_parameters() / 1e9:.2f}B parameters, "
            f"micro-batch {t.micro_batch} x {cfg.model.seq_len}: {tokens_per_s:,.0f} tokens/s, {mfu}, "
            f"{memory}, host syncs per step {syncs.total}{cuda_count}")


# ------------------------------------------------------------------ MoE layer against dense

def moe_against_dense_row(tokens: int, d_model: int, experts: int, device: torch.device,
                          reps: int) -> str:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(approximate="tanh"),
                          nn.Linear(4 * d_model, d_model)).to(device)
    moe = MoELayer(d_model, 4 * d_model, MoEConfig(num_experts=experts, capacity_factor=1.0)).to(device)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.02)
    x = torch.randn(1, tokens, d_model, device=device, requires_grad=True)
    grad = torch.randn_like(x)

    def step(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                y = layer(x)
            (y[0] if isinstance(y, tuple) else y).backward(grad)
            layer.zero_grad(set_to_none=False)
        return run

    ratio = timed(step(moe), device, reps) / timed(step(dense), device, reps)
    return (f"MoE layer fwd+bwd / dense FFN of the same active size ({experts} experts, {tokens} "
            f"tokens, hidden {d_model}, {device.type} {str(dtype).removeprefix('torch.')}): {ratio:.3f}")


# ------------------------------------------------------------------ grouped GEMM experts

def grouped_mm_supported(device: torch.device) -> bool:
    return (device.type == "cuda" and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(device) >= (9, 0))


def grouped_expert_ffn(rows: Tensor, ends: Tensor, row_expert: Tensor, experts: Experts,
                       dtype: torch.dtype) -> Tensor:
    """The experts' FFN over rows grouped by expert (``ends``: int32 cumulative row counts),
    with no capacity padding: one grouped GEMM per matrix."""
    w_in, w_out = experts.w_in.to(dtype), experts.w_out.to(dtype)
    pre = torch._grouped_mm(rows.to(dtype), w_in, offs=ends) + experts.bias_in[row_expert].to(dtype)
    h = F.gelu(pre, approximate="tanh")
    return torch._grouped_mm(h, w_out, offs=ends) + experts.bias_out[row_expert].to(dtype)


def routed_rows(tokens: int, experts: int, capacity: int, generator: torch.Generator) -> Tensor:
    """Rows each expert keeps when ``tokens`` pick an expert uniformly at random."""
    choice = torch.randint(0, experts, (tokens,), generator=generator)
    return torch.bincount(choice, minlength=experts).clamp(max=capacity)


def expert_ffn_row(tokens: int, d_model: int, experts: int, device: torch.device, reps: int) -> str:
    """The grouped GEMM against the batched product on the same routed rows: on CPU the two
    are only checked to agree (torch's CPU fallback is no measure of a GPU's kernels)."""
    capacity = tokens // experts
    torch.manual_seed(0)
    layer = Experts(experts, d_model, 4 * d_model).to(device)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.02)
    kept = routed_rows(tokens, experts, capacity, torch.Generator().manual_seed(0)).tolist()
    padded = torch.zeros(experts, capacity, d_model, device=device)
    for e, n in enumerate(kept):
        padded[e, :n] = torch.randn(n, d_model, device=device)
    slots = [(e, i) for e, n in enumerate(kept) for i in range(n)]
    row_expert = torch.tensor([e for e, _ in slots], device=device)
    rows = padded[row_expert, torch.tensor([i for _, i in slots], device=device)]
    ends = torch.tensor(kept, device=device).cumsum(0).to(torch.int32)
    gpu = grouped_mm_supported(device)
    dtype = torch.bfloat16 if gpu else torch.float32
    grouped = grouped_expert_ffn(rows, ends, row_expert, layer, dtype)
    with torch.autocast(device.type, dtype=dtype, enabled=gpu):
        batched = layer(padded)[row_expert, torch.tensor([i for _, i in slots], device=device)]
    diff = (grouped.float() - batched.float()).abs().max().item()
    agreement = f"outputs agree to {diff:.1e}"
    if not gpu:
        return f"expert FFN, torch._grouped_mm / batched product: {NO_GPU} ({agreement} on {device.type})"

    def run_grouped() -> None:
        x = rows.detach().requires_grad_()
        grouped_expert_ffn(x, ends, row_expert, layer, dtype).float().square().mean().backward()

    def run_batched() -> None:
        x = padded.detach().requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            layer(x).float().square().mean().backward()

    ratio = timed(run_grouped, device, reps) / timed(run_batched, device, reps)
    faster = "grouped GEMM" if ratio < 1 else "batched product"
    return (f"expert FFN fwd+bwd, torch._grouped_mm / batched product ({experts} experts, {tokens} "
            f"tokens, capacity {capacity}, {sum(kept)} rows kept, bf16): {ratio:.3f} ({faster} is "
            f"faster; {agreement})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU test)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else NO_GPU
    print(f"device: {name}, torch {torch.__version__}")
    if device.type != "cuda" and not args.smoke:
        print(f"training throughput and MFU: {NO_GPU} (--smoke runs the rows at a tiny shape on CPU)")
        print(expert_ffn_row(256, 32, 8, device, 1))
        return
    if args.smoke:
        tiny = ["model.seq_len=32", "model.n_layer=2", "model.d_model=32", "model.n_head=2",
                "model.vocab_size=257", "train.micro_batch=2"]
        for preset, experts in (("gpt-350m", []), ("gpt-350m-moe128", ["model.moe.num_experts=8"])):
            print(training_row(preset, tiny + experts, device, args.steps))
        print(moe_against_dense_row(256, 32, 8, device, args.steps))
        print(expert_ffn_row(256, 32, 8, device, args.steps))
        return
    for preset, micro_batch in (("gpt-350m", 8), ("gpt-350m-moe128", 8)):
        print(training_row(preset, [f"train.micro_batch={micro_batch}"], device, args.steps))
    print(moe_against_dense_row(16384, 1024, 128, device, args.steps))
    print(expert_ffn_row(16384, 1024, 128, device, args.steps))


if __name__ == "__main__":
    main()
