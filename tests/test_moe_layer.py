"""The MoE layer: dispatch/combine against a per-token reference, modes, gradients."""

import pytest
import torch
import torch.nn.functional as F

import raymoe.model.moe as moe
from raymoe.config import ModelConfig, MoEConfig
from raymoe.model.gpt import MLP
from raymoe.model.moe import MoELayer


def make_layer(d=16, f=32, **moe) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(d, f, MoEConfig(**moe))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def reference_output(layer: MoELayer, x: torch.Tensor, gate) -> torch.Tensor:
    """Token by token: the chosen experts' FFN times the combine weight (a plain loop)."""
    e = layer.experts
    tokens = x.reshape(-1, x.shape[-1])
    expert = gate.expert.reshape(tokens.shape[0], -1)
    weight = gate.weight.reshape(expert.shape)
    out = torch.zeros_like(tokens)
    for s in range(tokens.shape[0]):
        for j in range(expert.shape[1]):
            k = expert[s, j]
            h = F.gelu(tokens[s] @ e.w_in[k] + e.bias_in[k], approximate="tanh")
            out[s] += weight[s, j] * (h @ e.w_out[k] + e.bias_out[k])
    return out.reshape(x.shape)


@pytest.mark.parametrize("top_k", [1, 2])
def test_output_equals_per_token_reference_and_dropped_tokens_get_zero(top_k):
    layer = make_layer(num_experts=4, top_k=top_k, capacity_factor=0.5, min_capacity=1,
                       use_rts=False, second_expert_sampling=False)
    x = torch.randn(2, 20, 16)
    logits = layer.router(x.reshape(-1, 16))
    gate = layer.gate(logits)
    y, stats = layer(x)
    assert torch.allclose(y, reference_output(layer, x, gate), atol=1e-5)
    dropped = (~gate.kept).reshape(40, -1).all(dim=1)
    assert bool(dropped.any()), "capacity factor 0.5 must drop tokens"
    assert torch.all(y.reshape(40, 16)[dropped] == 0)
    assert stats.dropped_fraction == pytest.approx(float((~gate.kept).float().mean()))
    assert int(stats.tokens_per_expert.sum()) == 40 * top_k


def test_one_expert_with_room_for_all_equals_a_dense_ffn():
    cfg = ModelConfig(d_model=16, n_head=2)
    dense = MLP(cfg)
    layer = MoELayer(16, 64, MoEConfig(num_experts=1, capacity_factor=1.0, use_rts=False))
    with torch.no_grad():
        # GPT initialises every parameter; a bare layer's are torch.empty's, NaN at times
        torch.nn.init.normal_(layer.router.weight, std=0.3)
        layer.experts.w_in.copy_(dense.fc.weight.T[None])
        layer.experts.bias_in.copy_(dense.fc.bias[None])
        layer.experts.w_out.copy_(dense.proj.weight.T[None])
        layer.experts.bias_out.copy_(dense.proj.bias[None])
    x = torch.randn(3, 10, 16)
    y, stats = layer(x)
    assert stats.dropped_fraction == 0.0
    assert torch.allclose(y, dense(x), atol=1e-6)  # softmax over 1 expert: weight 1


def test_router_and_experts_receive_gradients():
    layer = make_layer(num_experts=4)
    y, stats = layer(torch.randn(2, 16, 16))
    (y.square().mean() + 0.01 * stats.l_aux).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w_in.grad.abs().sum() > 0


def test_eval_mode_uses_eval_capacity_factor_and_no_noise():
    layer = make_layer(num_experts=4, capacity_factor=0.5, eval_capacity_factor=4.0,
                       min_capacity=1, noisy_gate_policy="RSample", use_rts=False,
                       eval_drop_tokens=True)
    x = torch.randn(1, 64, 16)
    layer.train()
    _, train_stats = layer(x)
    assert train_stats.capacity == 8  # ceil(64 / 4 * 0.5)
    layer.eval()
    _, first = layer(x)
    y1, _ = layer(x)
    y2, second = layer(x)
    assert first.capacity == 64  # ceil(64 / 4 * 4.0)
    assert torch.equal(y1, y2), "eval must be deterministic: no gate noise"
    assert second.dropped_fraction == 0.0


def test_eval_drops_no_token_by_default():
    layer = make_layer(num_experts=4, capacity_factor=0.25, min_capacity=1)
    layer.eval()
    _, stats = layer(torch.randn(1, 64, 16))
    assert stats.dropped_fraction == 0.0 and stats.capacity == int(stats.tokens_per_expert.max())


def test_jitter_only_in_training():
    layer = make_layer(num_experts=4, noisy_gate_policy="Jitter")
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer.router(x), layer.router(x))
    layer.train()
    assert not torch.equal(layer.router(x), layer.router(x))


def test_no_tensor_of_tokens_by_experts_by_capacity():
    """Peak memory stays near the activations: 4096 tokens, 128 experts, capacity 32 would
    make DeepSpeed's combine tensor 4096*128*32*4 bytes = 64 MiB on its own."""
    layer = make_layer(d=64, f=128, num_experts=128, use_rts=True)
    x = torch.randn(4096, 64, requires_grad=True)
    with torch.profiler.profile(profile_memory=True) as prof:
        y, _ = layer(x)
        y.sum().backward()
    biggest = max(e.cpu_memory_usage for e in prof.key_averages())
    assert biggest < 16 * 2**20


def test_expert_gradients_equal_plain_autograd_and_accumulate():
    torch.manual_seed(1)
    experts = make_layer(d=8, f=16, num_experts=11).experts  # 11: uneven chunks
    x = torch.randn(11, 5, 8, requires_grad=True)
    params = [experts.w_in, experts.bias_in, experts.w_out, experts.bias_out]
    plain = [p.detach().clone().requires_grad_() for p in params]
    x_plain = x.detach().clone().requires_grad_()
    h = F.gelu(torch.baddbmm(plain[1].unsqueeze(1), x_plain, plain[0]), approximate="tanh")
    (torch.baddbmm(plain[3].unsqueeze(1), h, plain[2]).sin().sum()).backward()
    for _ in range(2):  # the second backward adds onto the first
        experts(x).sin().sum().backward()
    for ours, ref in zip(params, plain, strict=False):
        assert torch.allclose(ours.grad, 2 * ref.grad, atol=1e-5)
    assert torch.allclose(x.grad, 2 * x_plain.grad, atol=1e-5)


@pytest.mark.parametrize("rows", [None, [3, 0, 0, 5, 0, 0, 0, 0, 1, 0, 0], [2, 1, 4, 5, 3, 1, 2, 5, 1, 4, 2]])
def test_experts_without_gradients_equal_the_training_path_and_read_only_touched_experts(rows, monkeypatch):
    torch.manual_seed(1)
    experts = make_layer(d=8, f=16, num_experts=11).experts
    x = torch.randn(11, 5, 8)
    training = experts(x.requires_grad_()).detach()  # _ExpertFFN, every row
    ran: list[int] = []
    ffn = moe._ffn
    monkeypatch.setattr(moe, "_ffn", lambda x, w_in, *rest: ran.append(w_in.shape[0]) or ffn(x, w_in, *rest))
    with torch.no_grad():
        inference = experts(x.detach(), rows)
    real = [(e, n) for e, n in enumerate(rows)] if rows is not None else [(e, 5) for e in range(11)]
    for e, n in real:
        torch.testing.assert_close(inference[e, :n], training[e, :n], rtol=1e-6, atol=1e-6)
    # 3 of 11 experts touched: each alone, on its rows; else one product over all 11
    assert ran == ([1, 1, 1] if rows is not None and rows.count(0) > 5 else [11])


@pytest.mark.parametrize("top_k", [1, 2])
def test_input_and_router_gradients_equal_the_per_token_reference(top_k):
    layer = make_layer(num_experts=4, top_k=top_k, capacity_factor=0.75, min_capacity=1,
                       use_rts=False, second_expert_sampling=False)
    x = torch.randn(2, 12, 16, requires_grad=True)
    probe = torch.randn(2, 12, 16)
    (layer(x)[0] * probe).sum().backward()
    ours = (x.grad.clone(), layer.router.weight.grad.clone())
    x.grad, layer.router.weight.grad = None, None
    gate = layer.gate(layer.router(x.reshape(-1, 16)))
    (reference_output(layer, x, gate) * probe).sum().backward()
    assert torch.allclose(ours[0], x.grad, atol=1e-5)
    assert torch.allclose(ours[1], layer.router.weight.grad, atol=1e-5)
