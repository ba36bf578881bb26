"""The GPT: reference parameter counts, training behaviour, input checks (token ids where
they enter: prompts and scored texts)."""

import pytest
import torch

from raymoe.config import load_config
from raymoe.data.tokenizers import ByteTokenizer
from raymoe.eval.scoring import Scorer
from raymoe.model import GPT
from raymoe.model.generation import generate

BILLION = 1e9


def meta_model(preset: str) -> GPT:
    cfg = load_config(preset)
    with torch.device("meta"):
        return GPT(cfg.model)


@pytest.mark.parametrize("preset,expected", [
    ("gpt-350m", 0.35), ("gpt-1.3b", 1.3), ("gpt-6.7b", 6.7),
    ("gpt-350m-moe128", 13.0), ("gpt-1.3b-moe128", 52.0)])
def test_reference_sizes_within_5_percent(preset, expected):
    total = meta_model(preset).num_parameters() / BILLION
    assert abs(total - expected) / expected < 0.05, f"{preset}: {total:.3f}B"


@pytest.mark.parametrize("moe,dense", [("gpt-350m-moe128", "gpt-350m"),
                                       ("gpt-1.3b-moe128", "gpt-1.3b")])
def test_moe_active_parameters_are_the_dense_base_plus_routers(moe, dense):
    moe_model, dense_model = meta_model(moe), meta_model(dense)
    routers = sum(layer.router.weight.numel() for layer in moe_model.moe_layers)
    assert len(moe_model.moe_layers) == 12
    assert [i + 1 for i, b in enumerate(moe_model.blocks) if b.is_moe] == list(range(2, 25, 2))
    assert moe_model.num_parameters(active_only=True) == dense_model.num_parameters() + routers
    assert routers / dense_model.num_parameters() < 0.005


def test_vocab_is_padded_to_a_multiple_of_128():
    cfg = load_config("gpt-350m")
    assert cfg.model.padded_vocab_size == 50304


def tiny_batch(cfg, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.seq_len + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def test_tiny_moe_gpt_overfits_one_batch():
    cfg = load_config("tiny-moe8", ["model.seq_len=32", "model.moe.use_rts=false"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    x, y = tiny_batch(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(400):  # about 150 steps reach the bound; the trajectory is the CPU's rounding
        out = model(x, y)
        losses.append(out.lm_loss.item())
        if losses[-1] < 0.5:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[0] > 5.0
    assert losses[-1] < 0.5, f"loss went {losses[0]:.2f} -> {losses[-1]:.2f} in {len(losses)} steps"


def test_loss_is_lm_plus_coefficient_times_l_aux():
    cfg = load_config("tiny-moe8", ["model.moe.loss_coef=0.5", "model.moe.z_loss_coef=0.1"])
    model = GPT(cfg.model)
    out = model(*tiny_batch(cfg))
    assert len(out.moe_stats) == 2
    expected = out.lm_loss + 0.5 * sum(s.l_aux for s in out.moe_stats) \
        + 0.1 * sum(s.z_loss for s in out.moe_stats)
    assert torch.allclose(out.loss, expected)
    assert out.z_loss > 0


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = load_config("tiny-moe8", ["model.moe.use_rts=false"])
    ckpt = load_config("tiny-moe8", ["model.moe.use_rts=false", "model.activation_checkpointing=true"])
    torch.manual_seed(0)
    plain = GPT(cfg.model)
    checkpointed = GPT(ckpt.model)
    checkpointed.load_state_dict(plain.state_dict())
    batch = tiny_batch(cfg)
    for model in (plain, checkpointed):
        model(*batch).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=False):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_out_of_range_token_id_is_named_where_it_enters():
    """Prompts and scored texts are checked on the host, before the device sees them."""
    model = GPT(load_config("tiny").model)
    with pytest.raises(ValueError, match="prompt token id 300 is outside the vocabulary \\[0, 257\\)"):
        generate(model, [[1, 2], [3, 300, 4]], max_new_tokens=1)
    scorer = Scorer(model, ByteTokenizer())
    with pytest.raises(ValueError, match="continuation token id -1 is outside the vocabulary"):
        scorer.loglikelihoods([([1, 2], [3]), ([4], [5, -1])])
    with pytest.raises(ValueError, match="context token id 257 is outside the vocabulary"):
        scorer.choice_loglikelihoods([([1, 257, 2], [[3], [4]])])


def test_sequence_longer_than_the_model_is_rejected():
    cfg = load_config("tiny", ["model.seq_len=16"])
    with pytest.raises(ValueError, match="exceeds model.seq_len=16"):
        GPT(cfg.model)(torch.zeros(1, 17, dtype=torch.long))
