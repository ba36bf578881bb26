"""Gradient reduction and global-norm clipping for data + expert parallelism.

Why expert gradients are divided by the WORLD size: each rank's loss is the mean over its
own tokens, and the objective is the mean of those losses over all N ranks. After the
backward pass (whose all-to-all carries gradients back to the experts' owners), the rank
holding expert e in EP group G has sum_{j in G} dL_j/dW_e. Summing that over the
expert-data-parallel group (one replica of e per EP group) gives sum over all ranks j of
dL_j/dW_e, and the objective's gradient is that sum / N. Dividing by the
expert-data-parallel size (N / ep) instead would scale expert gradients by ep and make the
step depend on the EP size. DeepSpeed divides by N too; the tests check an N-rank step
equals the 1-rank step on the same global batch for every EP size.

With sharding (raymoe.parallel.shard) FSDP reduce-scatters the same sums during the
backward pass, and each rank ends with its own slice of every gradient: the norm is then
one sum of local squares over all ranks, and clipping scales the local slices.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from raymoe.model.moe import is_expert_parameter
from raymoe.parallel.mesh import Mesh
from raymoe.parallel.shard import is_sharded


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) parameters that train, in a stable order."""
    dense: list[nn.Parameter] = []
    expert: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (expert if is_expert_parameter(name) else dense).append(param)
    return dense, expert


def _grads(params: Iterable[nn.Parameter]) -> list[Tensor]:
    """Every parameter's gradient, zeros where none was produced, so ranks stay aligned."""
    out = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        out.append(p.grad)
    return out


def local_grad(param: nn.Parameter) -> Tensor | None:
    """This rank's part of a parameter's gradient (all of it when not sharded)."""
    grad = param.grad
    return grad.to_local() if isinstance(grad, DTensor) else grad


def _all_reduce_scaled(grads: list[Tensor], group: dist.ProcessGroup | None, divisor: int) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat.div_(divisor)
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=False):
        grad.copy_(reduced)


def reduce_gradients(model: nn.Module, mesh: Mesh) -> None:
    """Dense gradients: mean over all ranks. Expert gradients: sum over their
    expert-data-parallel group / world size (see the module docstring). A sharded model's
    gradients were reduced during the backward pass."""
    if not mesh.is_distributed or is_sharded(model):
        return
    dense, expert = split_parameters(model)
    _all_reduce_scaled(_grads(dense), None, mesh.world_size)
    _all_reduce_scaled(_grads(expert), mesh.expert_dp_group, mesh.world_size)


def global_grad_norm(model: nn.Module, mesh: Mesh) -> Tensor:
    """The L2 norm of the full model's gradient: dense counted once, each expert once.

    Call after ``reduce_gradients``: unsharded, dense gradients are then equal on every
    rank and each expert's equal on its replicas, so summing expert squares over one EP
    group counts every expert exactly once. Sharded, every element lives on one rank.
    """
    zero = torch.zeros((), dtype=torch.float32, device=_device(model))
    if is_sharded(model):
        grads = [g for p in model.parameters() if (g := local_grad(p)) is not None]
        total = sum((g.float().square().sum() for g in grads), zero)
        dist.all_reduce(total)
        return total.sqrt()
    dense, expert = split_parameters(model)
    dense_sq = sum((g.float().square().sum() for g in _grads(dense)), zero)
    expert_sq = sum((g.float().square().sum() for g in _grads(expert)), zero.clone())
    if mesh.is_distributed and mesh.ep_size > 1:
        dist.all_reduce(expert_sq, group=mesh.ep_group)
    return (dense_sq + expert_sq).sqrt()


def scale_gradients(model: nn.Module, max_norm: float, norm: Tensor) -> None:
    """Clip: scale all gradients by min(1, max_norm / (norm + 1e-6)), as torch's clip does."""
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if (grad := local_grad(p)) is not None:
            grad.mul_(coef.to(grad.dtype))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
