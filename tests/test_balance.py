"""Loss-free balancing (model.moe.bias_update_rate): a per-expert bias that steers the
choice of expert only, moved after each step toward equal loads. The N-rank step's
biases equal one process's (tests/test_expert_parallel.py runs its configs with it on)."""

from __future__ import annotations

import pytest
import torch

from raymoe.config import ConfigError, MoEConfig, load_config
from raymoe.model import GPT
from raymoe.model.gating import top1_gating, top2_gating
from raymoe.model.moe import MoELayer, Router
from raymoe.parallel.checkpoint import load_checkpoint, save_checkpoint
from raymoe.parallel.mesh import Mesh


def test_the_bias_changes_the_choice_but_not_the_weights_or_l_aux():
    logits = torch.randn(400, 4, generator=torch.Generator().manual_seed(0))
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    plain = top1_gating(logits, 4.0, 4, use_rts=False)
    biased = top1_gating(logits, 4.0, 4, use_rts=False, selection_bias=bias)
    assert torch.equal(biased.expert, torch.argmax(logits + bias, dim=1))
    assert (biased.expert == 3).float().mean() > 0.9 > (plain.expert == 3).float().mean()
    chosen = torch.softmax(logits, 1).gather(1, biased.expert[:, None]).squeeze(1)
    assert torch.allclose(biased.weight[biased.kept], chosen[biased.kept])  # the unbiased softmax
    gates = torch.softmax(logits, 1)  # l_aux from the unbiased gates and the biased counts
    expected = (gates.mean(0) * biased.exp_counts.float() / 400).sum() * 4
    assert biased.l_aux == pytest.approx(float(expected), rel=1e-6)
    first, second = top2_gating(logits, 4.0, 4, selection_bias=bias,
                                generator=torch.Generator().manual_seed(1)).expert.unbind(1)
    assert torch.equal(first, torch.argmax(logits + bias, dim=1)) and not torch.equal(first, second)


def test_a_bias_moves_toward_equal_loads_by_the_rate():
    router = Router(8, 4, None, bias_update_rate=0.01)
    router.balance(torch.tensor([10, 0, 2, 0]))  # mean 3: over, under, under, under
    assert router.balance_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    router.balance(torch.tensor([3, 3, 3, 3]))  # balanced: no move
    assert router.balance_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    assert Router(8, 4, None).balance_bias is None  # off: no buffer, nothing saved


def test_updates_bring_a_collapsed_router_back_to_balance():
    """The router's weights sending every token to expert 0; the updates alone, from each
    batch's loads, spread them (no optimizer: only the bias moves)."""
    layer = MoELayer(16, 32, MoEConfig(num_experts=4, bias_update_rate=0.05, use_rts=False))
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        layer.router.weight[0] += 0.2
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0)).abs()  # x . w0 > 0
    dropped = []
    for _ in range(100):
        _, stats = layer(x)
        dropped.append(float(stats.dropped_fraction))
        layer.router.balance(stats.tokens_per_expert)
    assert dropped[0] > 0.7 and max(dropped[-10:]) < 0.25, dropped


def test_the_biases_are_saved_and_loaded_with_the_model(tmp_path):
    cfg = load_config("tiny-moe8", ["model.moe.bias_update_rate=0.001", "model.n_layer=2",
                                    "model.d_model=32"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    for i, layer in enumerate(model.moe_layers):
        layer.router.balance(torch.arange(8) * (i + 1))
    save_checkpoint(tmp_path / "step-1", model, Mesh(1), extra={"config": cfg.to_dict()})
    fresh = GPT(cfg.model)
    assert all(layer.router.balance_bias.abs().sum() == 0 for layer in fresh.moe_layers)
    load_checkpoint(tmp_path / "step-1", fresh, Mesh(1))
    for saved, loaded in zip(model.moe_layers, fresh.moe_layers, strict=True):
        assert torch.equal(saved.router.balance_bias, loaded.router.balance_bias)


def test_a_negative_rate_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="model.moe.bias_update_rate"):
        load_config("tiny-moe8", ["model.moe.bias_update_rate=-0.1"])
