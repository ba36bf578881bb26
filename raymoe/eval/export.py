"""Export a checkpoint as safetensors: a dense model as a Hugging Face GPT-2 directory
(GPT2LMHeadModel loads it with the same logits), an MoE model in raymoe's own layout.

The MoE layout (config.json "format": "raymoe-moe/1"), tensors named as in raymoe.model:
  wte.weight [padded vocab, d] (tied output embedding), wpe.weight [seq_len, d], ln_f.*
  blocks.{i}.ln_1.*, blocks.{i}.attn.qkv.{weight [3d, d], bias}, blocks.{i}.attn.proj.*
  blocks.{i}.ln_2.*, then per layer either a dense MLP: blocks.{i}.mlp.fc.*, mlp.proj.*
  (torch Linear, y = x W^T + b) or an MoE layer (every expert, by global id):
    blocks.{i}.mlp.router.weight [E, d]    gates = softmax(x @ router^T) in fp32
    blocks.{i}.mlp.router.balance_bias [E] with loss-free balancing only: the expert
      chosen is argmax(x @ router^T + balance_bias); its weight is still its gate
    blocks.{i}.mlp.experts.w_in [E, d, f], bias_in [E, f]
    blocks.{i}.mlp.experts.w_out [E, f, d], bias_out [E, d]
      expert e: y = gelu_tanh(x @ w_in[e] + bias_in[e]) @ w_out[e] + bias_out[e]
  config.json also holds the model config (the top-1/top-2 gate's settings included).
Files above max_shard_bytes are split as Hugging Face does (model-0000k-of-0000n.safetensors
and model.safetensors.index.json).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from raymoe.config import config_from_dict
from raymoe.data.tokenizers import GPT2_FILES, BPETokenizer, Tokenizer
from raymoe.eval.loading import LoadedModel
from raymoe.model import GPT

MOE_FORMAT = "raymoe-moe/1"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def hf_gpt2_state(loaded: LoadedModel) -> dict[str, Tensor]:
    """GPT2LMHeadModel's tensors (Conv1D weights are [in, out]: transposed Linear ones)."""
    model, vocab = loaded.model, loaded.tokenizer.vocab_size
    state = {"transformer.wte.weight": model.wte.weight[:vocab],
             "transformer.wpe.weight": model.wpe.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias}
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
             "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i, block in enumerate(model.blocks):
        for ours, theirs in names.items():
            module = block.get_submodule(ours)
            assert isinstance(module, nn.LayerNorm | nn.Linear), ours
            weight = module.weight if ours.startswith("ln_") else module.weight.t()
            state[f"transformer.h.{i}.{theirs}.weight"] = weight
            state[f"transformer.h.{i}.{theirs}.bias"] = module.bias
    return state


def hf_gpt2_config(loaded: LoadedModel) -> dict[str, object]:
    m, eot = loaded.config.model, loaded.tokenizer.eot_id
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": loaded.tokenizer.vocab_size, "n_positions": m.seq_len,
            "n_embd": m.d_model, "n_layer": m.n_layer, "n_head": m.n_head, "n_inner": m.d_ffn,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "initializer_range": m.init_std, "scale_attn_weights": True,
            "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot,
            "torch_dtype": "float32"}


def export(loaded: LoadedModel, out: str | Path, dtype: torch.dtype = torch.float32,
           max_shard_bytes: int = 5 * 2**30) -> Path:
    """A dense model as a Hugging Face GPT-2 directory; an MoE model in MOE_FORMAT."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if loaded.config.model.moe.enabled:
        state = dict(loaded.model.state_dict())
        config: dict[str, object] = {"format": MOE_FORMAT, "model": loaded.config.to_dict()["model"],
                                     "tokenizer": loaded.tokenizer.spec, "step": loaded.step}
    else:
        state, config = hf_gpt2_state(loaded), hf_gpt2_config(loaded)
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_safetensors({k: v.detach().to(dtype) for k, v in state.items()}, out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    write_tokenizer(loaded.tokenizer, out, loaded.config.model.seq_len)
    return out


def write_safetensors(state: dict[str, Tensor], out: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({tensor: name for tensor in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / SAFETENSORS_INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")


def read_safetensors(directory: str | Path) -> dict[str, Tensor]:
    """Every tensor of an export (one file or shards)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.is_file() else ["model.safetensors"])
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def load_moe_export(directory: str | Path) -> GPT:
    """The GPT of an MoE export, in one process, ready for inference."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("format") != MOE_FORMAT:
        raise ValueError(f"{directory}/config.json: format {config.get('format')!r}, "
                         f"expected {MOE_FORMAT!r}")
    model = GPT(config_from_dict({"model": config["model"]}).model)
    model.load_state_dict(read_safetensors(directory), strict=True)
    return model.eval()


def write_tokenizer(tokenizer: Tokenizer, out: Path, max_length: int) -> str | None:
    """Hugging Face tokenizer files: GPT-2's vocab.json + merges.txt, or a trained BPE's
    tokenizer.json. Raw bytes have no Hugging Face tokenizer: none is written."""
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "model_max_length": max_length}
    if tokenizer.spec == "gpt2":
        shutil.copyfile(GPT2_FILES / "encoder.json", out / "vocab.json")
        shutil.copyfile(GPT2_FILES / "vocab.bpe", out / "merges.txt")
        config = {"tokenizer_class": "GPT2Tokenizer", **special}
    elif isinstance(tokenizer, BPETokenizer):
        tokenizer.save(out / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    else:
        return None
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return str(config["tokenizer_class"])
