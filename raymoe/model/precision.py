"""The precision policy, one for training and inference (the same code on either device).

``train.precision``: fp32 runs without autocast; bf16 autocasts matrix products to bf16
on GPU and on a CPU with native bf16 (AVX-512 BF16, AMX, Arm BF16); auto takes bf16 on
GPU, and on CPU only where the CPU has native bf16 and the model is wide enough that
bf16 is faster there. Routers and log-probabilities stay in fp32 either way.

The CPU rule comes from a train step (forward, backward, AdamW) of the tiny presets,
micro-batch 8 x 128 tokens, one thread, on an AVX-512 BF16 CPU (best of 7 steps):

    ============  =======  ======  ======  ======
    model         d_model  fp32    bf16    ratio
    ============  =======  ======  ======  ======
    tiny          128        93 ms   88 ms   1.05
    tiny          256       309 ms  196 ms   1.58
    tiny          512       990 ms  560 ms   1.77
    tiny-moe8     128       121 ms  120 ms   1.01
    tiny-moe8     256       397 ms  308 ms   1.29
    tiny-moe8     512      1104 ms  710 ms   1.55
    ============  =======  ======  ======  ======

At d_model 128 the bf16 casts cost what the faster products save; from 256 on bf16 wins.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from torch import nn

from raymoe.config import Config, ConfigError, Precision

CPU_BF16_MIN_D_MODEL = 256
"""auto on CPU: bf16 from this model width on (the measurement above)."""

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""/proc/cpuinfo flags of a native bf16 dot product: x86 (AVX-512 BF16, AMX), Arm (BF16)."""


@cache
def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 dot products natively, from the kernel's CPU flags.

    torch.backends.cpu.get_cpu_capability() says AVX512 for CPUs with and without BF16,
    and oneDNN's bf16 check accepts plain AVX-512 (where it emulates bf16, slower than
    fp32); the kernel's flags name the instructions themselves. No /proc/cpuinfo (not
    Linux): False, fp32 is the safe choice."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool(NATIVE_BF16_FLAGS & set(value.split()))
    return False


def autocast_dtype(device: torch.device, precision: Precision = "auto",
                   d_model: int = 0) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32). ``d_model``
    decides auto on CPU (0, as inference passes: fp32)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if precision == "bf16":
        if not cpu_has_native_bf16():
            raise ConfigError("train.precision: bf16 needs a CPU with native bf16 (AVX-512 "
                              "BF16 or AMX); this one would emulate it, slower than fp32: "
                              "use auto or fp32")
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() and d_model >= CPU_BF16_MIN_D_MODEL else None


def training_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training and validation, and of FSDP's gathered parameters."""
    return autocast_dtype(device, cfg.train.precision, cfg.model.d_model)


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device``; None: off (fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def autocast(device: torch.device) -> torch.autocast:
    """Inference's autocast: bf16 on GPU, fp32 on CPU."""
    return autocast_to(device, autocast_dtype(device))


def cast_for_inference(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Store in ``dtype`` the weights that autocast to ``dtype`` casts at every use: the
    linear layers' and the experts' (not the embeddings, norms or routers, which stay
    fp32). Their products then give the same numbers, without an fp32 copy held and read
    each step: decoding reads every weight it uses once per token, so an fp32 expert
    cast at each step is 4 bytes read, 2 written and 2 read again per parameter, not 2."""
    if dtype is None:
        return
    from raymoe.model.moe import Experts

    for module in model.modules():
        if isinstance(module, (nn.Linear, Experts)):
            module.to(dtype)
