"""data.extra_validation: other prepared datasets a run validates on, each its own metric
(val_loss/NAME), checked when the trainer starts. The datasets here are written in this
process in the layout `raymoe prepare` writes (no Ray), from slices of the bundled books."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from multiproc import run_distributed
from one_process import train_in_one_process

from raymoe.config import Config, ConfigError, config_from_dict, load_config
from raymoe.data.prepare import SplitPacker
from raymoe.data.shards import (
    FORMAT,
    MANIFEST,
    SPLITS,
    DatasetError,
    PreparedDataset,
    ShardTable,
    index_path,
    token_dtype,
)
from raymoe.data.storage import locate
from raymoe.data.stream import SequenceReader
from raymoe.data.tokenizers import TOKENIZER_FILE, load_tokenizer, train_tokenizer
from raymoe.eval.loading import load_model
from raymoe.model import GPT
from raymoe.runs import latest_checkpoint, read_manifest, read_metrics
from raymoe.train.loop import FileHooks, Trainer
from raymoe.train.preflight import open_extra_validation, preflight

CORPUS = Path(__file__).resolve().parents[1] / "raymoe" / "sample" / "corpus"
SEQ_LEN = 32


def book(name: str, start: int, chars: int = 12_000) -> str:
    return (CORPUS / f"{name}.txt").read_text(encoding="utf-8")[start:start + chars]


def write_dataset(root: Path, splits: dict[str, str], seq_len: int = SEQ_LEN, tokenizer: str = "bytes") -> str:
    """A prepared dataset of each split's text as one document (a split not given is empty),
    written as `raymoe prepare` lays it out: shards, shard tables, then the manifest."""
    tok = load_tokenizer(tokenizer)
    location = locate(str(root))
    trained = tokenizer not in ("bytes", "gpt2")
    if trained:
        location.join(TOKENIZER_FILE).write_bytes(Path(tokenizer).read_bytes())
    dtype, row_group = token_dtype(tok.vocab_size), 16
    counts = {}
    for split in SPLITS:
        packer = SplitPacker(location, split, seq_len, shard_sequences=100_000, row_group_sequences=row_group)
        if split in splits:
            packer.add(np.asarray(tok.encode_batch([splits[split]])[0] + [tok.eot_id], dtype=dtype))
        packer.finish()
        location.join(*index_path(split).split("/")).write_bytes(ShardTable.of(split, packer.shards).encode())
        counts[split] = {"sequences": sum(s.sequences for s in packer.shards), "shards": len(packer.shards)}
    manifest = {"format": FORMAT, "tokenizer": TOKENIZER_FILE if trained else tok.spec,
                "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "seq_len": seq_len, "dtype": dtype.name,
                "row_group_sequences": row_group, "splits": counts}
    location.join(MANIFEST).write_bytes(json.dumps(manifest).encode())
    return str(root)


@pytest.fixture
def austen(tmp_path) -> str:
    """The training data."""
    return write_dataset(tmp_path / "austen", {"train": book("Pride_and_Prejudice", 20_000),
                                               "validation": book("Pride_and_Prejudice", 200_000, 4_000)})


def tiny_config(data: str, run_dir: Path, *overrides: str) -> Config:
    return load_config("tiny-moe8", [
        f"data.path={data}", f"train.storage={run_dir.parent}", f"train.run_name={run_dir.name}",
        "parallel.num_workers=1", "model.n_layer=2", "model.d_model=32", "model.n_head=2",
        f"model.seq_len={SEQ_LEN}", "model.moe.num_experts=4", "train.global_batch=4",
        "train.micro_batch=2", "train.max_steps=4", "train.eval_every=1", "train.eval_batches=3",
        "train.checkpoint_every=4", "train.precision=fp32", "optim.lr=1e-2", "optim.warmup_tokens=1",
        *overrides])


@pytest.fixture
def extra_sets(tmp_path) -> dict[str, tuple[str, str]]:
    """NAME -> (dataset, the split its evaluation reads)."""
    carol = write_dataset(tmp_path / "carol", {"train": book("A_Christmas_Carol", 20_000),
                                               "validation": book("A_Christmas_Carol", 100_000, 4_000)})
    frankenstein = write_dataset(tmp_path / "frankenstein",  # no validation split: its train split
                                 {"train": book("Frankenstein_Or_The_Modern_Prometheus", 50_000)})
    return {"carol": (carol, "validation"), "frankenstein": (frankenstein, "train")}


def with_extra_sets(extra_sets: dict[str, tuple[str, str]]) -> list[str]:
    return [f"data.extra_validation.{name}={data}" for name, (data, _) in extra_sets.items()]


def mean_loss(model: GPT, data: str, split: str, cfg: Config, world: int) -> float:
    """What an evaluation at ``world`` ranks reads, computed here in one process: each
    rank's train.eval_batches micro-batches of ``split`` from its start, in stored order."""
    losses = []
    for rank in range(world):
        with SequenceReader(PreparedDataset.open(data), split, rank, world, cfg.train.micro_batch * world,
                            seed=cfg.data.seed, shuffle=False, window=cfg.data.shuffle_window) as reader:
            for _ in range(cfg.train.eval_batches):
                rows = torch.from_numpy(reader.next_batch(cfg.train.micro_batch).astype(np.int64))
                with torch.no_grad():
                    losses.append(model(rows[:, :-1], rows[:, 1:]).lm_loss)
    return float(torch.stack(losses).mean())


def checkpoint_losses(run_dir: Path, cfg: Config, training: str, extra_sets: dict[str, tuple[str, str]],
                      world: int) -> dict[str, float]:
    """val_loss and val_loss/NAME of the run's final checkpoint, as evaluated here."""
    checkpoint = latest_checkpoint(str(run_dir))
    assert checkpoint is not None
    model = load_model(checkpoint).model
    sets = {"val_loss": (training, "validation"), **{f"val_loss/{k}": v for k, v in extra_sets.items()}}
    return {key: mean_loss(model, data, split, cfg, world) for key, (data, split) in sets.items()}


def test_each_extra_set_is_logged_as_the_checkpoint_scores_it(austen, extra_sets, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(austen, run_dir, *with_extra_sets(extra_sets))
    train_in_one_process(cfg, run_dir)

    evaluations = [r for r in read_metrics(str(run_dir / "metrics")) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [1, 2, 3, 4]
    # each evaluation reads from the start: the 4th reads what a fresh reader reads
    expected = checkpoint_losses(run_dir, cfg, austen, extra_sets, world=1)
    assert {k: v for k, v in evaluations[-1].items() if k.startswith("val_loss")} == pytest.approx(expected, rel=1e-5)
    losses = list(expected.values())
    assert min(abs(a - b) for i, a in enumerate(losses) for b in losses[i + 1:]) > 1e-3, losses
    saved = read_manifest(str(latest_checkpoint(str(run_dir))))["extra"]["config"]
    assert saved["data"]["extra_validation"] == cfg.data.extra_validation


def _train_and_validate(rank: int, world: int, cfg: Config, run_dir: Path) -> dict[str, float]:
    trainer = Trainer(cfg, FileHooks(run_dir, keep=1, rank=rank), torch.device("cpu"),
                      metrics_uri=run_dir / "metrics", log=lambda _: None)
    trainer.run()
    return trainer.validate()


def test_two_ranks_validate_in_step_and_agree(austen, extra_sets, tmp_path):
    """Every rank evaluates every set in the same order (one all-reduce for all): a rank
    out of step would hang the gloo group, which multiproc's timeout fails."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(austen, run_dir, "parallel.num_workers=2", *with_extra_sets(extra_sets))
    results = run_distributed(_train_and_validate, 2, tmp_path, cfg, run_dir)
    assert results[0] == results[1]
    logged = [r for r in read_metrics(str(run_dir / "metrics")) if "val_loss" in r][-1]
    assert {k: v for k, v in logged.items() if k.startswith("val_loss")} == results[0]
    assert results[0] == pytest.approx(checkpoint_losses(run_dir, cfg, austen, extra_sets, world=2), rel=1e-5)


@pytest.mark.parametrize(("seq_len", "tokenizer", "found"), [
    (16, "bytes", "tokenizer 'bytes' and seq_len 16"),
    (SEQ_LEN, "gpt2", f"tokenizer 'gpt2' and seq_len {SEQ_LEN}"),
])
def test_an_extra_set_of_another_tokenizer_or_length_stops_the_start(austen, tmp_path, seq_len, tokenizer, found):
    other = write_dataset(tmp_path / "other", {"train": book("A_Christmas_Carol", 20_000, 2_000)}, seq_len, tokenizer)
    cfg = tiny_config(austen, tmp_path / "run", f"data.extra_validation.other={other}")
    expected = (f"data.extra_validation.other: {other} has {found}; expected those of the training "
                f"data {austen}: tokenizer 'bytes' and seq_len {SEQ_LEN}")
    with pytest.raises(DatasetError) as raised:
        Trainer(cfg, FileHooks(tmp_path / "run", keep=1, rank=0), torch.device("cpu"), log=lambda _: None)
    assert str(raised.value) == expected


def test_trained_tokenizers_must_be_the_same_file(tmp_path):
    text = book("A_Christmas_Carol", 20_000, 8_000)
    first = train_tokenizer([text], 300, tmp_path / "first.json")
    second = train_tokenizer([text.upper()], 300, tmp_path / "second.json")
    assert first.vocab_size == second.vocab_size
    training = write_dataset(tmp_path / "training", {"train": text}, tokenizer=str(tmp_path / "first.json"))
    same = write_dataset(tmp_path / "same", {"train": text[:2_000]}, tokenizer=str(tmp_path / "first.json"))
    other = write_dataset(tmp_path / "other", {"train": text[:2_000]}, tokenizer=str(tmp_path / "second.json"))
    cfg = load_config("tiny", [f"data.path={training}", f"data.extra_validation.same={same}"])
    assert [e.split for e in open_extra_validation(cfg, PreparedDataset.open(training))] == ["train"]
    cfg = load_config("tiny", [f"data.path={training}", f"data.extra_validation.other={other}"])
    with pytest.raises(DatasetError, match=r"data\.extra_validation\.other: .* has tokenizer 'tokenizer\.json "
                                           r"\(sha256 \w{12}\)'.*expected .*tokenizer 'tokenizer\.json \(sha256"):
        open_extra_validation(cfg, PreparedDataset.open(training))


def test_a_yaml_mapping_and_dotted_overrides_build_it_and_to_dict_keeps_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\ndata:\n  extra_validation:\n    carol: runs/carol\n"
                    "    twain-2: s3://bucket/twain\n")
    cfg = load_config(str(path), ["data.extra_validation.frankenstein=runs/frankenstein"])
    assert cfg.data.extra_validation == {"carol": "runs/carol", "twain-2": "s3://bucket/twain",
                                         "frankenstein": "runs/frankenstein"}
    assert config_from_dict(cfg.to_dict()) == cfg
    assert load_config("tiny").data.extra_validation == {}


@pytest.mark.parametrize(("override", "message"), [
    ("data.extra_validaton.carol=runs/carol",
     "data.extra_validaton: unknown key; did you mean 'data.extra_validation'?"),
    ("data.extra_validation.two words=runs/carol",
     "data.extra_validation.two words: the name 'two words' must be letters, digits, _ or -"),
    ("data.extra_validation.carol=", "data.extra_validation.carol: must name a prepared dataset"),
    ("data.extra_validation.carol=7", "data.extra_validation.carol: expected a string, got 7"),
    ("data.extra_validation.carol.path=runs/carol", "data.extra_validation.carol: expected a string"),
    ("data.extra_validation=runs/carol", "data.extra_validation: expected a mapping of NAME: value"),
])
def test_a_bad_entry_names_its_key(override, message):
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", [override])
    assert str(raised.value).startswith(message)


def test_a_missing_extra_set_is_named_before_training(austen, tmp_path):
    missing = str(tmp_path / "nowhere")
    cfg = tiny_config(austen, tmp_path / "run", f"data.extra_validation.gone={missing}")
    expected = rf"^data\.extra_validation\.gone: {re.escape(missing)}: no manifest\.json; not a prepared dataset"
    with pytest.raises(DatasetError, match=expected):
        preflight(cfg, str(tmp_path / "run"))
    with pytest.raises(DatasetError, match=expected):
        Trainer(cfg, FileHooks(tmp_path / "run", keep=1, rank=0), torch.device("cpu"), log=lambda _: None)
