"""Data: prepare real books into shards (local disk and the local S3 server), stream them
to ranks, resume exactly from a cursor, and refuse bad input by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, REPO, skip_without_shared_data

from raymoe.data.prepare import PrepareError, PrepareOptions, is_validation, prepare, read_documents
from raymoe.data.shards import DatasetError, PreparedDataset
from raymoe.data.stream import Cursor, SequenceReader
from raymoe.data.text import decode_text, strip_gutenberg
from raymoe.data.tokenizers import gpt2_tokenizer, load_tokenizer, train_tokenizer

BOOKS = [CORPUS / "Dickens_Charles" / "A_Christmas_Carol.txt",
         CORPUS / "Twain_Mark" / "A_Dog_s_Tale.txt",
         CORPUS / "Austen_Jane" / "Lady_Susan.txt"]
SEQ_LEN = 64


@pytest.fixture(scope="module")
def books_dir(tmp_path_factory) -> Path:
    skip_without_shared_data()
    directory = tmp_path_factory.mktemp("books")
    for book in BOOKS:
        (directory / book.name).write_bytes(book.read_bytes())
    return directory


@pytest.fixture(scope="module")
def split_dataset(ray_cluster, books_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "split"
    prepare(PrepareOptions([str(books_dir)], str(out), tokenizer="gpt2", seq_len=SEQ_LEN,
                           val_fraction=0.2, doc_chars=4000, docs_per_shard=16), log=lambda _: None)
    return out


def all_sequences(dataset: PreparedDataset, split: str) -> np.ndarray:
    return np.concatenate([dataset.read_shard(s) for s in dataset.shards(split)])


def test_gpt2_tokenizer_gives_the_real_gpt2_ids():
    tok = gpt2_tokenizer()
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode_batch(["Hello world"]) == [[15496, 995]]


def test_token_count_equals_tokenizing_the_cleaned_text(ray_cluster, books_dir, tmp_path):
    manifest = prepare(PrepareOptions([str(books_dir)], str(tmp_path / "ds"), seq_len=SEQ_LEN,
                                      val_fraction=0.0), log=lambda _: None)
    tok = gpt2_tokenizer()
    texts = [strip_gutenberg(decode_text(b.read_bytes(), str(b))) for b in BOOKS]
    direct = sum(len(ids) + 1 for ids in tok.encode_batch(texts))  # + end-of-text per book
    train = manifest["splits"]["train"]
    assert train["tokens"] == direct
    assert train["sequences"] * (SEQ_LEN + 1) + train["dropped_tokens"] == direct
    dataset = PreparedDataset.open(str(tmp_path / "ds"))
    sequences = all_sequences(dataset, "train")
    assert sequences.shape == (train["sequences"], SEQ_LEN + 1) and sequences.dtype == np.uint16
    assert "*** START OF" not in tok.decode(sequences.reshape(-1).tolist())


def test_sequences_decode_to_text_spans_and_splits_do_not_overlap(split_dataset, books_dir):
    dataset = PreparedDataset.open(str(split_dataset))
    tok = dataset.tokenizer()
    docs = [d for b in sorted(books_dir.iterdir()) for d in read_documents(str(b), "text", 4000)]
    by_split = {"train": [], "validation": []}
    for doc_id, text in docs:
        by_split["validation" if is_validation(doc_id, 1234, 0.2) else "train"].append(text)
    assert by_split["validation"] and by_split["train"]
    corpus = {k: "\n".join(v) for k, v in by_split.items()}
    for split, other in (("train", "validation"), ("validation", "train")):
        sequences = all_sequences(dataset, split)
        assert sequences.shape[1] == SEQ_LEN + 1
        for row in sequences[:: max(1, len(sequences) // 40)]:
            for piece in tok.decode(row.tolist()).split("<|endoftext|>"):
                piece = piece.strip("\ufffd")  # a cut may split a multi-byte character
                if len(piece) >= 80:
                    assert piece in corpus[split], f"a {split} span is not {split} text"
                    assert piece not in corpus[other], f"a {split} span appears in {other}"


def test_prepare_and_stream_through_the_local_s3_server(ray_cluster, s3_server, books_dir,
                                                        split_dataset):
    fs, bucket = s3_server["fs"], s3_server["bucket"]
    for book in books_dir.iterdir():
        with fs.open_output_stream(f"{bucket}/corpus/{book.name}") as f:
            f.write(book.read_bytes())
    prepare(PrepareOptions([f"s3://{bucket}/corpus"], f"s3://{bucket}/prepared", seq_len=SEQ_LEN,
                           val_fraction=0.2, doc_chars=4000, docs_per_shard=16),
            log=lambda _: None)
    on_s3 = PreparedDataset.open(f"s3://{bucket}/prepared")
    local = PreparedDataset.open(str(split_dataset))
    def total_tokens(dataset: PreparedDataset) -> int:  # splits differ: ids name the source
        return sum(s["tokens"] for s in dataset.manifest["splits"].values())

    assert total_tokens(on_s3) == total_tokens(local)
    assert all(s.path.startswith("train/") for s in on_s3.shards("train"))
    with SequenceReader(on_s3, "train", 0, 1, seed=3) as reader:
        streamed = reader.next_batch(on_s3.manifest["splits"]["train"]["sequences"])
    assert sorted(map(bytes, streamed)) == sorted(map(bytes, all_sequences(on_s3, "train")))


def read_batches(dataset_uri: str, rank: int, world: int, cursor: Cursor | None, batches: int,
                 size: int = 4) -> tuple[list[np.ndarray], Cursor]:
    with SequenceReader(PreparedDataset.open(dataset_uri), "train", rank, world, seed=7,
                        cursor=cursor) as reader:
        out = [reader.next_batch(size) for _ in range(batches)]
        return out, reader.cursor


RESUME_SCRIPT = """
import json, sys, numpy as np, ray
sys.path[:0] = {paths!r}
from raymoe.data.stream import Cursor
from test_data import read_batches
ray.init(address={address!r}, log_to_driver=False)
batches, cursor = read_batches({uri!r}, {rank}, {world}, Cursor.from_dict(json.loads({cursor!r})), {n})
np.save({out!r}, np.stack(batches))
"""


def test_exact_resume_from_a_cursor_in_a_new_driver(ray_cluster, split_dataset, tmp_path):
    uri = str(split_dataset)
    for rank in (0, 1):
        uninterrupted, _ = read_batches(uri, rank, 2, None, 8)
        _, cursor = read_batches(uri, rank, 2, None, 3)
        out = tmp_path / f"resumed{rank}.npy"
        script = RESUME_SCRIPT.format(paths=[str(REPO), str(REPO / "tests")],
                                      address=ray_cluster.address_info["address"], uri=uri,
                                      rank=rank, world=2, cursor=json.dumps(cursor.to_dict()),
                                      n=5, out=str(out))
        subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
        assert np.array_equal(np.load(out), np.stack(uninterrupted[3:]))


def test_an_epoch_delivers_every_sequence_once_across_ranks(ray_cluster, split_dataset):
    dataset = PreparedDataset.open(str(split_dataset))
    total = dataset.manifest["splits"]["train"]["sequences"]
    per_rank = total // 2
    seen = []
    for rank in (0, 1):
        with SequenceReader(dataset, "train", rank, 2, seed=7) as reader:
            seen.extend(map(bytes, reader.next_batch(per_rank)))
            assert reader.cursor == Cursor(epoch=0, position=2 * per_rank)
    everything = list(map(bytes, all_sequences(dataset, "train")))
    assert len(set(seen)) == len(seen) == 2 * per_rank
    assert set(seen) <= set(everything) and len(set(everything) - set(seen)) == total % 2


def test_resume_with_another_world_size_repeats_nothing_of_the_epoch(ray_cluster, split_dataset):
    uri = str(split_dataset)
    dataset = PreparedDataset.open(uri)
    total = dataset.manifest["splits"]["train"]["sequences"]
    seen, cursor = [], None
    for rank in (0, 1):
        batches, cursor = read_batches(uri, rank, 2, None, 5)
        seen.extend(bytes(r) for b in batches for r in b)
    remaining = total - len(seen)
    for rank in range(3):
        with SequenceReader(dataset, "train", rank, 3, seed=7, cursor=cursor) as reader:
            seen.extend(map(bytes, reader.next_batch(remaining // 3)))
            assert reader.cursor.epoch == 0
    assert len(set(seen)) == len(seen) >= total - 3


def test_corrupt_shard_and_out_of_range_tokens_are_named(ray_cluster, split_dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(split_dataset, copy)
    dataset = PreparedDataset.open(str(copy))
    shard = dataset.shards("train")[0]
    path = copy / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"shard .*{shard.path}: checksum does not match"):
        dataset.read_shard(shard)
    with pytest.raises(DatasetError, match="checksum does not match"):
        with SequenceReader(dataset, "train", 0, 1, seed=0, shuffle=False) as reader:
            reader.next_batch(dataset.manifest["splits"]["train"]["sequences"])
    shutil.copyfile(split_dataset / shard.path, path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["vocab_size"] = 100
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=f"{shard.path}: token id \\d+ is outside the vocabulary"):
        PreparedDataset.open(str(copy)).read_shard(shard)


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "empty.txt: empty file"),
    ("binary.txt", b"\x00\x01\x02 not text", "binary.txt: contains NUL bytes"),
    ("records.jsonl", b'{"body": "text"}\n', "records.jsonl: line 1 has no string field 'text'"),
])
def test_bad_input_is_named_and_leaves_no_manifest(ray_cluster, books_dir, tmp_path, name,
                                                    content, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "good.txt").write_bytes(BOOKS[1].read_bytes())
    (inputs / name).write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # an earlier run's: must not survive a failure
    with pytest.raises(PrepareError, match=message):
        prepare(PrepareOptions([str(inputs)], str(out), seq_len=SEQ_LEN), log=lambda _: None)
    assert not (out / "manifest.json").exists()


def test_parquet_input_and_missing_column(ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [strip_gutenberg(decode_text(b.read_bytes(), str(b))) for b in BOOKS[:2]]
    pq.write_table(pa.table({"content": texts}), tmp_path / "docs.parquet")
    with pytest.raises(PrepareError, match="docs.parquet: no column 'text'"):
        prepare(PrepareOptions([str(tmp_path / "docs.parquet")], str(tmp_path / "a")),
                log=lambda _: None)
    manifest = prepare(PrepareOptions([str(tmp_path / "docs.parquet")], str(tmp_path / "b"),
                                      text_field="content", seq_len=SEQ_LEN, val_fraction=0.0),
                       log=lambda _: None)
    assert manifest["splits"]["train"]["tokens"] == sum(len(i) + 1 for i in gpt2_tokenizer().encode_batch(texts))


def test_missing_input_and_unreachable_bucket_are_named(s3_server, tmp_path, monkeypatch):
    with pytest.raises(PrepareError, match="nowhere: no such file or directory$"):
        prepare(PrepareOptions([str(tmp_path / "nowhere")], str(tmp_path / "o")))
    with pytest.raises(PrepareError, match="s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"):
        prepare(PrepareOptions(["s3://no-such-bucket/x"], str(tmp_path / "o")))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    denied = "cannot list s3://raymoe/corpus: .*(ACCESS_DENIED|SIGNATURE_DOES_NOT_MATCH)"
    with pytest.raises(PrepareError, match=denied):
        prepare(PrepareOptions(["s3://raymoe/corpus"], str(tmp_path / "o")))


def test_trained_tokenizer_is_recorded_with_the_shards(ray_cluster, books_dir, tmp_path):
    texts = [strip_gutenberg(decode_text(b.read_bytes(), str(b))) for b in BOOKS]
    tok = train_tokenizer(texts, vocab_size=1000, out=tmp_path / "tok" / "tokenizer.json")
    assert tok.vocab_size == 1000
    assert load_tokenizer(str(tmp_path / "tok" / "tokenizer.json")).encode_batch(["Scrooge"]) \
        == tok.encode_batch(["Scrooge"])
    prepare(PrepareOptions([str(books_dir)], str(tmp_path / "ds"), seq_len=SEQ_LEN,
                           tokenizer=str(tmp_path / "tok" / "tokenizer.json"), val_fraction=0.0),
            log=lambda _: None)
    (tmp_path / "tok" / "tokenizer.json").unlink()  # the dataset carries its own copy
    dataset = PreparedDataset.open(str(tmp_path / "ds"))
    assert dataset.manifest["tokenizer"] == "tokenizer.json" and dataset.vocab_size == 1000
    row = all_sequences(dataset, "train")[5]
    assert dataset.tokenizer().decode(row.tolist()).strip("\ufffd") in "\n".join(texts)
