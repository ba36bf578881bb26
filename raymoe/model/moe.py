"""The Mixture-of-Experts feed-forward layer: router, index-based dispatch, batched experts.

Tokens are never expanded into a [tokens, experts, capacity] tensor. After gating, the kept
(token, expert) assignments travel to the ranks that own those experts (an identity with
one rank), are packed into an [local experts, C, d] buffer by index and run through all
local experts as one batched matrix product; results travel back the same way and are
added to their tokens scaled by the combine weight (raymoe.model.dispatch).

The layer knows nothing about process groups: it talks to an ``ExpertExchange``. With
``LocalExchange`` one process holds every expert; raymoe.parallel provides the
expert-parallel exchange over torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raymoe.config import MoEConfig
from raymoe.model.dispatch import ExpertExchange, LocalExchange, dispatch_fixed, dispatch_variable
from raymoe.model.exchange_tape import taped
from raymoe.model.gating import (
    GateOutput,
    expert_capacity,
    router_z_loss,
    top1_gating,
    top2_gating,
)

__all__ = ["ExpertExchange", "is_expert_parameter", "LocalExchange", "MoELayer", "MoEStats", "Router", "Experts",
           "GateOutput", "expert_capacity", "top1_gating", "top2_gating"]


def is_expert_parameter(name: str) -> bool:
    """Whether a parameter name (from ``named_parameters``) belongs to an expert."""
    return ".experts." in name


@dataclass
class MoEStats:
    """What one MoE layer saw in its last forward (detached, except the losses)."""

    l_aux: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    """(E,) tokens routed to each expert before dropping, on this rank."""
    dropped_fraction: Tensor
    """Scalar, on the device (read it on the host once per step, not per layer)."""
    capacity: int
    """Rows per local expert in this rank's expert buffer (with dropping and the
    fixed-capacity exchange: EP size x the gate's capacity)."""


class Router(nn.Module):
    """The gate's linear map, always computed in fp32 (also under bf16 autocast); with
    loss-free balancing (``bias_update_rate`` > 0) also the experts' selection bias, a
    buffer that every rank updates alike from the step's all-reduced loads."""

    balance_bias: Tensor | None

    def __init__(self, d_model: int, num_experts: int, noisy_gate_policy: str | None,
                 bias_update_rate: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.noisy_gate_policy = noisy_gate_policy
        self.bias_update_rate = bias_update_rate
        self.register_buffer("balance_bias", torch.zeros(num_experts) if bias_update_rate > 0 else None)

    @torch.no_grad()
    def balance(self, tokens_per_expert: Tensor) -> None:
        """Loss-free balancing's update after a step: each expert's bias up by the rate when
        its load (tokens routed to it, over all ranks) is under the mean, down when over."""
        if self.balance_bias is None:
            return
        load = tokens_per_expert.double()  # on the host: the step's summary already read
        step = torch.sign(load.mean() - load).float() * self.bias_update_rate
        if step.device != self.balance_bias.device:
            step = step.to(self.balance_bias.device, non_blocking=True)  # to the device: no wait
        self.balance_bias.add_(step)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x = x * torch.empty_like(x).uniform_(1.0 - 1e-2, 1.0 + 1e-2)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x, self.weight.float())


class Experts(nn.Module):
    """The feed-forward networks of this rank's experts, stacked along a leading dim."""

    def __init__(self, num_local_experts: int, d_model: int, d_ffn: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(num_local_experts, d_model, d_ffn))
        self.bias_in = nn.Parameter(torch.zeros(num_local_experts, d_ffn))
        self.w_out = nn.Parameter(torch.empty(num_local_experts, d_ffn, d_model))
        self.bias_out = nn.Parameter(torch.zeros(num_local_experts, d_model))

    @property
    def num_local_experts(self) -> int:
        return self.w_in.shape[0]

    def forward(self, x: Tensor, rows: list[int] | None = None) -> Tensor:
        """(E_local, C, d) -> (E_local, C, d); ``rows``: each expert's real rows (the first
        of its C), where known: then the other rows' outputs are left unset (a caller reads
        only real rows). With gradients, batched products over EXPERT_CHUNKS chunks
        (_ExpertFFN); without (evaluation, inference), see _experts_no_grad."""
        params = (self.w_in, self.bias_in, self.w_out, self.bias_out)
        if torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad):
            return _ExpertFFN.apply(x, *params)
        return _experts_no_grad(x, rows, *params)


NO_GRAD_CHUNK_BYTES = 64 * 2**20
"""Without gradients, the experts run in chunks whose transient tensors (the [experts, C,
ffn] pre-activation and activation, and the weights cast to the compute dtype) are at most
this large."""


@torch.no_grad()
def _experts_no_grad(x: Tensor, rows: list[int] | None, w_in: Tensor, b_in: Tensor, w_out: Tensor,
                     b_out: Tensor) -> Tensor:
    """The experts without autograd, reading only the weights a batch needs.

    Where at most half the experts got rows (decoding a small batch: one token reaches
    one expert), each of those runs on its real rows alone and the others' weights are
    not read: a batch touches only some experts, which is what lets a MoE model decode
    about as fast as its base (the padding rows' outputs stay unset: nothing reads them).
    Otherwise the products are batched over all experts in as few chunks as
    NO_GRAD_CHUNK_BYTES allows (_ExpertFFN's EXPERT_CHUNKS bound backward's memory, which
    inference does not keep, and cost a product per chunk: 0.3 against 0.17 ms per layer
    for a token at 8 experts, d_model 128, one CPU thread).
    """
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    y = x.new_empty(x.shape[0], x.shape[1], w_out.shape[2])
    active = [e for e, n in enumerate(rows) if n] if rows is not None else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        if active is not None and 2 * len(active) <= x.shape[0]:
            for e in active:
                part, n = slice(e, e + 1), rows[e]  # type: ignore[index]
                _ffn(x[part, :n], w_in[part], b_in[part], w_out[part], b_out[part], dtype, y[part, :n])
            return y
        d, ffn, size = x.shape[2], w_in.shape[2], x.element_size()
        per_expert = 2 * x.shape[1] * ffn * size + (2 * d * ffn * size if w_in.dtype != dtype else 0)
        step = max(NO_GRAD_CHUNK_BYTES // per_expert, 1)
        for first in range(0, x.shape[0], step):
            part = slice(first, first + step)
            _ffn(x[part], w_in[part], b_in[part], w_out[part], b_out[part], dtype, y[part])
    return y


def _ffn(x: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor, dtype: torch.dtype,
         out: Tensor) -> Tensor:
    """Experts' FFN, batched over their leading dim, into ``out``; the pre-activation."""
    pre = torch.baddbmm(b_in.unsqueeze(1).to(dtype), x, w_in.to(dtype))
    torch.baddbmm(b_out.unsqueeze(1).to(dtype), F.gelu(pre, approximate="tanh"), w_out.to(dtype), out=out)
    return pre


EXPERT_CHUNKS = 8
"""The experts run in this many batched chunks, so that per-chunk intermediates stay small."""


def _expert_chunks(num_local_experts: int) -> list[slice]:
    chunks = min(EXPERT_CHUNKS, num_local_experts)
    edges = [round(i * num_local_experts / chunks) for i in range(chunks + 1)]  # host arithmetic
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=False)]


class _ExpertFFN(torch.autograd.Function):
    """Batched expert FFN with a lean backward, for E experts of [C, d] rows each.

    Weight gradients leave backward as ordinary gradients, so autograd accumulates them
    and whatever hooks the parameters (FSDP's reduce-scatter, gradient hooks) sees them.
    With E experts they are E times a dense FFN's, and a fresh E x d x f buffer per
    matrix every step costs more in page faults on CPU than the products themselves. So
    backward adopts a parameter's existing gradient buffer: it takes ``param.grad`` off
    the parameter, adds this pass's gradient into it in place and returns it; autograd's
    AccumulateGrad then installs the returned tensor as the (now empty) ``.grad`` without
    a copy. The result is the same sum autograd forms (two uses of a parameter in one
    graph find ``.grad`` taken by the first and start from a fresh buffer); only a hook on
    the gradient sees the accumulated value instead of this pass's part. Keep gradients
    between steps (``zero_grad(set_to_none=False)``) to reuse the buffers; under FSDP the
    gradient is freed after each reduce-scatter, and backward allocates as for any other
    parameter.

    Only the input and the pre-activation are saved; the GELU output is recomputed in
    backward, and both passes run over EXPERT_CHUNKS chunks of experts so that the
    transient [experts, C, ffn] tensors are an eighth of the full size.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        x = x.to(dtype)
        y = x.new_empty(x.shape[0], x.shape[1], w_out.shape[2])
        pres = []
        with torch.autocast(device_type=x.device.type, enabled=False):
            for part in _expert_chunks(x.shape[0]):
                pres.append(_ffn(x[part], w_in[part], b_in[part], w_out[part], b_out[part], dtype, y[part]))
        ctx.save_for_backward(x, *pres)
        # The parameters themselves, not saved copies: backward adopts their .grad buffers
        # (saved-tensor hooks such as activation checkpointing hand back other objects).
        ctx.params = (w_in, b_in, w_out, b_out)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, *pres = ctx.saved_tensors
        w_in, b_in, w_out, b_out = ctx.params
        dtype = x.dtype
        grad_y = grad_y.to(dtype)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grads = [_adopt_grad(p) if needed else None
                 for p, needed in zip(ctx.params, ctx.needs_input_grad[1:], strict=True)]
        grad_w_in, grad_b_in, grad_w_out, grad_b_out = grads
        for part, pre in zip(_expert_chunks(x.shape[0]), pres, strict=True):
            g = grad_y[part]
            h = F.gelu(pre, approximate="tanh")
            _accumulate(grad_w_out, part, h.transpose(1, 2), g)
            _accumulate_bias(grad_b_out, part, g)
            del h
            grad_pre = torch.bmm(g, w_out[part].to(dtype).transpose(1, 2))
            torch.ops.aten.gelu_backward.grad_input(grad_pre, pre, approximate="tanh",
                                                    grad_input=grad_pre)
            _accumulate(grad_w_in, part, x[part].transpose(1, 2), grad_pre)
            _accumulate_bias(grad_b_in, part, grad_pre)
            if grad_x is not None:
                torch.bmm(grad_pre, w_in[part].to(dtype).transpose(1, 2), out=grad_x[part])
        return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _adopt_grad(param: Tensor) -> Tensor:
    """The buffer this backward returns as ``param``'s gradient: its current ``.grad``
    (taken off the parameter, see _ExpertFFN) or fresh zeros."""
    grad = param.grad
    if grad is None or grad.shape != param.shape or grad.dtype != param.dtype:
        return torch.zeros_like(param)
    param.grad = None
    return grad


def _accumulate(grad: Tensor | None, part: slice, a: Tensor, b: Tensor) -> None:
    """grad[part] += a @ b (batched), without a temporary when the dtypes agree."""
    if grad is None:
        return
    if a.dtype == grad.dtype:
        grad[part].baddbmm_(a, b)
    else:
        grad[part].add_(torch.bmm(a, b))


def _accumulate_bias(grad: Tensor | None, part: slice, grad_out: Tensor) -> None:
    if grad is not None:
        grad[part].add_(grad_out.sum(dim=1, dtype=grad.dtype))


class MoELayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, cfg: MoEConfig,
                 exchange: ExpertExchange | None = None, layer: int = 0):
        """``layer``: the index of its block in the model, which the exchanges' headers carry
        (ranks that reach different layers fail instead of exchanging)."""
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.exchange: ExpertExchange = exchange or LocalExchange()
        if cfg.num_experts % self.exchange.ep_size:
            raise ValueError(f"num_experts={cfg.num_experts} is not divisible by the "
                             f"expert-parallel size {self.exchange.ep_size}")
        self.num_experts = cfg.num_experts
        self.num_local_experts = cfg.num_experts // self.exchange.ep_size
        self.router = Router(d_model, cfg.num_experts, cfg.noisy_gate_policy, cfg.bias_update_rate)
        self.experts = Experts(self.num_local_experts, d_model, d_ffn)
        self.last_stats: MoEStats | None = None

    @property
    def global_expert_ids(self) -> range:
        first = self.exchange.ep_rank * self.num_local_experts
        return range(first, first + self.num_local_experts)

    def gate(self, logits: Tensor) -> GateOutput:
        cfg = self.cfg
        capacity_factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        drop_tokens = cfg.drop_tokens if self.training else cfg.eval_drop_tokens
        bias = self.router.balance_bias
        if cfg.top_k == 1:
            return top1_gating(logits, capacity_factor, cfg.min_capacity, drop_tokens,
                               cfg.use_rts, cfg.noisy_gate_policy if self.training else None,
                               selection_bias=bias)
        return top2_gating(logits, capacity_factor, cfg.min_capacity, drop_tokens,
                           cfg.second_expert_sampling and self.training, selection_bias=bias)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens)
        gate = self.gate(logits)
        exchange, dtype = taped(self.exchange), _compute_dtype(x)
        if gate.capacity is not None and self.cfg.fixed_capacity_exchange:
            y, capacity = dispatch_fixed(tokens, gate, exchange, self.experts, self.num_experts, dtype)
        else:
            y, capacity = dispatch_variable(tokens, gate, exchange, self.experts, self.num_experts, dtype,
                                            self.layer)
        stats = MoEStats(
            l_aux=gate.l_aux,
            z_loss=router_z_loss(logits) if self.cfg.z_loss_coef > 0 else logits.new_zeros(()),
            tokens_per_expert=gate.exp_counts.detach(),
            dropped_fraction=1.0 - gate.kept.float().mean(),
            capacity=capacity,
        )
        self.last_stats = stats
        return y.reshape(shape).to(x.dtype), stats
