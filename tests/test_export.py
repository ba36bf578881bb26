"""Export (Hugging Face GPT-2 for dense models, raymoe's safetensors layout for MoE) and
checkpoints of any expert-parallel size scoring alike in one process."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from multiproc import run_distributed

from raymoe.cli import main
from raymoe.config import config_from_dict, load_config
from raymoe.eval.export import MOE_FORMAT, load_moe_export, read_safetensors
from raymoe.eval.loading import inference_config, load_model
from raymoe.eval.scoring import Scorer
from raymoe.model import GPT
from raymoe.parallel.checkpoint import save_checkpoint
from raymoe.parallel.mesh import Mesh
from raymoe.runs import step_directory


def _logits(model, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[..., :vocab]


def test_dense_export_loads_in_transformers_with_the_same_logits(sentence_runs, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(sentence_runs(0)), "--format", "hf", "--out", str(out)]) == 0
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ours = load_model(str(sentence_runs(0))).model
    ids = torch.tensor([list(b"alice keeps a red kite in"), list(b"henry reads maps of dista")])
    assert torch.allclose(_logits(theirs, ids, 257), _logits(ours, ids, 257), atol=1e-4)


def test_gpt2_tokenizer_and_sharded_weights_load_in_transformers(tmp_path):
    cfg = load_config("tiny", ["model.vocab_size=50257", "model.d_model=32", "model.n_head=2",
                               "model.n_layer=2", "model.seq_len=64"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    run = tmp_path / "run"
    save_checkpoint(step_directory(run, 7), model, Mesh(1),
                    extra={"config": cfg.to_dict(), "tokenizer": "gpt2", "step": 7})
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out), "--max-shard-gb", "0.002"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    loaded = load_model(str(run))
    text = "Zero-shot evaluation of raymoe, on LAMBADA!"
    ids = tokenizer(text)["input_ids"]
    assert ids == loaded.tokenizer.encode_batch([text])[0]
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    batch = torch.tensor([ids])
    assert torch.allclose(_logits(theirs, batch, 50257), _logits(loaded.model, batch, 50257), atol=1e-4)


def test_moe_export_follows_the_documented_layout(sentence_runs, tmp_path):
    out = tmp_path / "moe"
    assert main(["export", str(sentence_runs(4)), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == MOE_FORMAT and config["tokenizer"] == "bytes"
    tensors = read_safetensors(out)
    assert tensors["blocks.1.mlp.router.weight"].shape == (4, 64)
    assert tensors["blocks.1.mlp.experts.w_in"].shape == (4, 64, 256)
    assert tensors["blocks.1.mlp.experts.w_out"].shape == (4, 256, 64)
    model = load_moe_export(out)
    ours = load_model(str(sentence_runs(4))).model
    ids = torch.tensor([list(b"grace feeds seven cats")])
    assert torch.equal(_logits(model, ids, 257), _logits(ours, ids, 257))


TEXTS = [("alice keeps a", " red kite"), ("bob drives", " a green truck"), ("erin", " paints"),
         ("frank repairs broken", " clocks in his shop"), ("zzz", " qqq")]


def _score_and_resave_with_ep_2(rank: int, world: int, source: str, target: str) -> list[float]:
    from raymoe.data.tokenizers import ByteTokenizer
    from raymoe.parallel.checkpoint import load_checkpoint
    from raymoe.runs import latest_checkpoint, read_manifest

    directory = latest_checkpoint(source)
    extra = read_manifest(directory)["extra"]
    cfg = inference_config(config_from_dict(extra["config"]))
    mesh = Mesh(ep_size=2)
    model = GPT(cfg.model, mesh.expert_exchange())
    load_checkpoint(directory, model, mesh)
    model.eval()
    scorer = Scorer(model, ByteTokenizer(), batch_size=2)
    scores = scorer.loglikelihoods(scorer.encode_pairs(TEXTS))
    save_checkpoint(step_directory(target, 300), model, mesh, extra=extra)
    return [s.logprob for s in scores]


def test_moe_checkpoint_saved_with_ep_2_scores_the_same_in_one_process(sentence_runs, tmp_path):
    target = tmp_path / "ep2"
    per_rank = run_distributed(_score_and_resave_with_ep_2, 2, tmp_path, str(sentence_runs(4)), str(target))
    assert per_rank[0] == per_rank[1]
    manifest = json.loads((step_directory(target, 300) / "manifest.json").read_text())
    assert manifest["ep_size"] == 2 and manifest["world_size"] == 2
    assert all((step_directory(target, 300) / f"__{rank}_0.distcp").is_file() for rank in (0, 1))
    for run in (target, sentence_runs(4)):  # written with EP 2, and the EP 1 original
        loaded = load_model(str(run))
        scorer = Scorer(loaded.model, loaded.tokenizer, batch_size=2)
        here = [s.logprob for s in scorer.loglikelihoods(scorer.encode_pairs(TEXTS))]
        assert here == pytest.approx(per_rank[0], abs=1e-5)
