"""What can be checked before any worker starts, checked on the driver: a typo in a data
path or a model shape that does not match the run's checkpoint costs a second, not the
start of a worker group on a cluster (and not four tracebacks from its workers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raymoe.config import Config
from raymoe.data.blend import Blend, open_blend
from raymoe.data.shards import DatasetError, PreparedDataset, sha256
from raymoe.data.tokenizers import TOKENIZER_FILE
from raymoe.runs import CheckpointError, checkpoint_manifest

MODEL_SHAPE_KEYS = ("vocab_size", "pad_vocab_to", "seq_len", "n_layer", "d_model", "n_head", "ffn_mult")
MOE_SHAPE_KEYS = ("num_experts", "every")


def open_training_data(cfg: Config) -> Blend:
    """The datasets of ``data.path`` or ``data.blend``, checked against the model (sequence
    length, vocabulary; a blend's datasets share both)."""
    blend = open_blend(cfg.data)
    dataset, m = blend.first, cfg.model
    if dataset.seq_len < m.seq_len:
        raise DatasetError(f"{dataset.uri}: sequences of {dataset.seq_len} tokens are "
                           f"shorter than model.seq_len={m.seq_len}")
    if dataset.vocab_size > m.vocab_size:
        raise DatasetError(f"{dataset.uri}: tokenizer {dataset.manifest['tokenizer']!r} "
                           f"has {dataset.vocab_size} tokens, model.vocab_size is {m.vocab_size}")
    return blend


@dataclass(frozen=True)
class ExtraValidation:
    """One of data.extra_validation, opened: its metric is val_loss/``name``."""

    name: str
    data: Blend
    """The dataset alone, as the readers take it."""
    split: str
    """Its validation split, or its train split where the validation split is empty."""


def open_extra_validation(cfg: Config, training: PreparedDataset) -> list[ExtraValidation]:
    """The datasets of data.extra_validation in the order of their names, the order every
    rank evaluates them in, each checked to share the training data's tokenizer and
    sequence length (else its loss would not be comparable, or not computable)."""
    expected = (_tokenizer_identity(training), training.seq_len)
    return [_open_extra(name, path, training.uri, expected)
            for name, path in sorted(cfg.data.extra_validation.items())]


def _open_extra(name: str, path: str, training_uri: str, expected: tuple[str, int]) -> ExtraValidation:
    key = f"data.extra_validation.{name}"
    try:
        dataset = PreparedDataset.open(path)
    except DatasetError as err:
        raise type(err)(f"{key}: {err}") from err
    found = (_tokenizer_identity(dataset), dataset.seq_len)
    if found != expected:
        raise DatasetError(f"{key}: {path} has tokenizer {found[0]!r} and seq_len {found[1]}; "
                           f"expected those of the training data {training_uri}: tokenizer "
                           f"{expected[0]!r} and seq_len {expected[1]}")
    validation = dataset.manifest["splits"].get("validation", {}).get("sequences", 0)
    return ExtraValidation(name, Blend([dataset], [1.0]), "validation" if validation else "train")


def _tokenizer_identity(dataset: PreparedDataset) -> str:
    """The manifest's tokenizer; a trained one (a tokenizer.json in the dataset) with its
    file's digest, since every trained tokenizer has the same name."""
    spec = dataset.manifest["tokenizer"]
    if spec != TOKENIZER_FILE:
        return spec
    return f"{spec} (sha256 {sha256(dataset.root.join(spec).read_bytes())[:12]})"


def shape_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """The model settings, as dotted keys with both values, in which a checkpoint's config
    (``saved``, a Config.to_dict()) differs from ``cfg`` in parameter shapes."""
    current = cfg.to_dict()["model"]
    model = saved.get("model", {})
    differ = [f"model.{k}: checkpoint {model.get(k)!r}, config {current[k]!r}"
              for k in MODEL_SHAPE_KEYS if model.get(k) != current[k]]
    differ += [f"model.moe.{k}: checkpoint {model.get('moe', {}).get(k)!r}, config {current['moe'][k]!r}"
               for k in MOE_SHAPE_KEYS if model.get("moe", {}).get(k) != current["moe"][k]]
    return differ


def check_resume_fits(cfg: Config, run_uri: str) -> None:
    """The run's latest checkpoint (if any), whose manifest is read where it lies, holds
    a model of the config's shape."""
    try:
        manifest = checkpoint_manifest(run_uri)
    except CheckpointError:
        return  # no complete checkpoint yet: a new run
    differ = shape_differences(manifest["extra"]["config"], cfg)
    if differ:
        raise CheckpointError(
            f"{manifest['uri']}: the run's latest checkpoint is of another model shape ("
            + "; ".join(differ) + "). Resume with the run's config, or start a new run "
            "(another train.run_name or train.storage)")


def preflight(cfg: Config, run_uri: str) -> None:
    open_extra_validation(cfg, open_training_data(cfg).first)
    check_resume_fits(cfg, run_uri)
