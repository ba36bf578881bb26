"""Data: prepare real books into shards (local disk and the local S3 server), stream them
to ranks, resume exactly from a cursor, and refuse bad input by name."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import CORPUS, REPO, needs_shared_data, skip_without_shared_data

from raymoe.config import BlendEntry, ConfigError, DataConfig, load_config
from raymoe.data.blend import open_blend
from raymoe.data.prepare import PrepareError, PrepareOptions, is_validation, prepare, read_documents
from raymoe.data.schedule import Cursor, EpochLayout, Source
from raymoe.data.shards import DatasetError, PreparedDataset
from raymoe.data.storage import Location
from raymoe.data.stream import SequenceReader
from raymoe.data.text import decode_text, strip_gutenberg
from raymoe.data.tokenizers import gpt2_tokenizer, load_tokenizer, train_tokenizer

BOOKS = [CORPUS / "Dickens_Charles" / "A_Christmas_Carol.txt",
         CORPUS / "Twain_Mark" / "A_Dog_s_Tale.txt",
         CORPUS / "Austen_Jane" / "Lady_Susan.txt"]
OTHER_BOOKS = [CORPUS / "Shelley_Mary_Wollstonecraft" / "Frankenstein_Or_The_Modern_Prometheus.txt"]
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
                           val_fraction=0.2, doc_chars=4000, shard_bytes=16 * 2**10,
                           row_group_bytes=2**10), log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def other_dataset(ray_cluster, tmp_path_factory) -> Path:
    """Other books, prepared like split_dataset: the second dataset of a blend."""
    skip_without_shared_data()
    books = tmp_path_factory.mktemp("other-books")
    for book in OTHER_BOOKS:
        (books / book.name).write_bytes(book.read_bytes())
    out = tmp_path_factory.mktemp("prepared") / "other"
    prepare(PrepareOptions([str(books)], str(out), tokenizer="gpt2", seq_len=SEQ_LEN,
                           val_fraction=0.0, shard_bytes=8 * 2**10, row_group_bytes=2**10),
            log=lambda _: None)
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
                           val_fraction=0.2, doc_chars=4000, shard_bytes=16 * 2**10,
                           row_group_bytes=2**10), log=lambda _: None)
    on_s3 = PreparedDataset.open(f"s3://{bucket}/prepared")
    local = PreparedDataset.open(str(split_dataset))

    def total_tokens(dataset: PreparedDataset) -> int:  # splits differ: ids name the source
        return sum(s["tokens"] for s in dataset.manifest["splits"].values())

    assert total_tokens(on_s3) == total_tokens(local)
    assert all(str(p).startswith("train/") for p in on_s3.shards("train").paths())
    total = on_s3.manifest["splits"]["train"]["sequences"]
    with SequenceReader(on_s3, "train", 0, 1, global_batch=1, seed=3) as reader:
        streamed = [reader.next_batch(1)[0] for _ in range(total)]  # one lane: nothing left over
    assert sorted(map(bytes, streamed)) == sorted(map(bytes, all_sequences(on_s3, "train")))


def global_batches(datasets: list[PreparedDataset], weights: list[float], world: int, steps: int,
                   cursor: Cursor | None = None, global_batch: int = 8, window: int = 2,
                   micro: int = 2) -> tuple[list[np.ndarray], Cursor]:
    """``steps`` global batches as ``world`` ranks read them (rank order, micro-batches of
    ``micro``), and the cursor after them."""
    readers = [SequenceReader(datasets, "train", rank, world, global_batch, seed=7,
                              weights=weights, cursor=cursor, window=window)
               for rank in range(world)]
    try:
        batches = [np.concatenate([r.next_batch(micro) for r in readers
                                   for _ in range(global_batch // world // micro)])
                   for _ in range(steps)]
        assert len({json.dumps(r.cursor.to_dict()) for r in readers}) == 1
        return batches, readers[0].cursor
    finally:
        for r in readers:
            r.close()


def epoch_steps(dataset: PreparedDataset, index: int, lanes: int, window: int, seed: int = 7) -> int:
    """Steps in epoch 0 of the blend's ``index``-th dataset."""
    source = Source("x", dataset.shards("train").sequences, dataset.row_group_sequences)
    return EpochLayout(source, index, lanes, seed, 0, window, True).steps


def test_blend_resumes_exactly_at_another_world_size(split_dataset, other_dataset):
    datasets = [PreparedDataset.open(str(split_dataset)), PreparedDataset.open(str(other_dataset))]
    members = [set(map(bytes, all_sequences(d, "train"))) for d in datasets]
    first_epoch = epoch_steps(datasets[0], 0, lanes=5, window=2)  # 0.6 of 8 slots
    steps = first_epoch + 10  # the first dataset starts its second epoch, the other does not
    uninterrupted, end = global_batches(datasets, [0.6, 0.4], 2, steps)
    first, cursor = global_batches(datasets, [0.6, 0.4], 2, 7)
    resumed, resumed_end = global_batches(datasets, [0.6, 0.4], 4, steps - 7,
                                          Cursor.from_dict(json.loads(json.dumps(cursor.to_dict()))))
    assert all(np.array_equal(a, b) for a, b in zip(uninterrupted, first + resumed, strict=True))
    assert resumed_end == end and end.epochs == [1, 0] and end.steps == [10, steps]
    rows = [bytes(r) for b in uninterrupted for r in b]
    epoch0 = [r for r in rows if r in members[0]][:first_epoch * 5]
    assert len(set(epoch0)) == len(epoch0)  # nothing repeated within the epoch
    windows = -(-len(datasets[0].shards("train")) // 2)
    assert len(epoch0) >= len(members[0]) - windows * 4  # skipped: < 5 lanes' worth per window
    of_second = [r for r in rows if r in members[1]]
    assert len(set(of_second)) == len(of_second) == 3 * steps


def test_blend_holds_its_weights_and_refuses_what_does_not_fit(split_dataset, other_dataset,
                                                               dataset):
    datasets = [PreparedDataset.open(str(split_dataset)), PreparedDataset.open(str(other_dataset))]
    members = set(map(bytes, all_sequences(datasets[1], "train")))
    batches, _ = global_batches(datasets, [0.7, 0.3], 2, 10_000 // 64 + 1, global_batch=64,
                                window=3, micro=4)
    rows = [bytes(r) for b in batches for r in b][:10_000]
    share = sum(r in members for r in rows) / len(rows)
    assert abs(share - 0.3) < 0.02, share
    with pytest.raises(DatasetError, match="weight 0.01 gives it no slot of a global batch of 8"):
        SequenceReader(datasets, "train", 0, 1, 8, seed=1, weights=[1.0, 0.01])
    with pytest.raises(DatasetError, match=r"data.blend: .*bytes has tokenizer 'bytes', .* has 'gpt2'"):
        open_blend(DataConfig(blend=[BlendEntry(str(split_dataset), 1.0), BlendEntry(str(dataset), 1.0)]))
    with pytest.raises(ConfigError, match=r"data.blend\[1\].weight: must be > 0"):
        load_config("tiny", [f"data.blend=[{{path: {split_dataset}}}, {{path: x, weight: 0}}]"])


class CountingFiles(pafs.FileSystemHandler):
    """The local filesystem, counting the bytes read from each file and the opens."""

    def __init__(self) -> None:
        self.local = pafs.LocalFileSystem()
        self.bytes_read: dict[str, int] = {}
        self.opens: dict[str, int] = {}

    def _open(self, path: str):
        self.opens[path] = self.opens.get(path, 0) + 1
        handler = self

        class Counted(io.FileIO):
            def read(self, size=-1):
                data = super().read(size)
                handler.bytes_read[path] = handler.bytes_read.get(path, 0) + len(data)
                return data

            def readinto(self, buffer):
                count = super().readinto(buffer)
                handler.bytes_read[path] = handler.bytes_read.get(path, 0) + (count or 0)
                return count

        return pa.PythonFile(Counted(path, "r"), mode="r")

    def open_input_file(self, path):
        return self._open(path)

    def open_input_stream(self, path):
        return self._open(path)

    def get_type_name(self):
        return "counting"

    def equals(self, other):
        return other is self

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def normalize_path(self, path):
        return path

    def _read_only(self, *args):
        raise OSError("read-only in this test")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


def test_ranks_read_their_share_and_the_manifest_once(dataset):
    world, batch = 4, 16
    files = CountingFiles()
    root = Location(pafs.PyFileSystem(files), str(dataset), str(dataset))
    datasets = [PreparedDataset.open(root) for _ in range(world)]  # one per rank, as in training
    assert sum(files.bytes_read.values()) == world * (dataset / "manifest.json").stat().st_size
    steps = epoch_steps(datasets[0], 0, lanes=batch, window=64, seed=1)
    per_rank = []
    for rank, data in enumerate(datasets):
        before = sum(files.bytes_read.values())
        reader = SequenceReader(data, "train", rank, world, batch, seed=1)
        for _ in range(steps - 3):  # reading ahead (2 steps) stays in the epoch
            reader.next_batch(batch // world)
        reader.close()
        per_rank.append(sum(files.bytes_read.values()) - before)
    shard_bytes = sum((dataset / p).stat().st_size for p in datasets[0].shards("train").paths())
    index_bytes = (dataset / "index" / "train.parquet").stat().st_size
    read = sum(per_rank) - world * index_bytes
    assert read <= 1.2 * shard_bytes, (read, shard_bytes)
    for rank_read in per_rank:
        assert 0.7 * shard_bytes / world < rank_read - index_bytes \
            <= 1.2 * shard_bytes / world, (per_rank, shard_bytes)
    assert files.opens[str(dataset / "manifest.json")] == world
    assert files.opens[str(dataset / "index" / "train.parquet")] == world


def test_a_global_batch_mixes_the_shards_of_its_window(dataset):
    data = PreparedDataset.open(str(dataset))
    table = data.shards("train")
    shard_of = {bytes(row): i for i in range(len(table)) for row in data.read_shard(table[i])}
    window, batch = 4, 32
    plan_layout = EpochLayout(Source("x", table.sequences, data.row_group_sequences), 0, batch, 7, 0,
                              window, True)
    batches, _ = global_batches([data], [1.0], 2, plan_layout.steps, global_batch=batch,
                                window=window, micro=4)
    for step, rows in enumerate(batches):
        w = int(np.searchsorted(plan_layout.first_step, step, side="right")) - 1
        shards = plan_layout.order[w * window:(w + 1) * window]
        lane_range = plan_layout.window_steps[w]  # a shorter shard can fall between two lanes
        full = int((table.sequences[shards] >= lane_range).sum())
        assert len({shard_of[bytes(r)] for r in rows}) >= min(window, full, batch)
    assert len(table) > window  # more than one window was read


@needs_shared_data
def test_validation_split_keeps_its_tokens(ray_cluster, tmp_path):
    austen = CORPUS / "Austen_Jane"
    out = tmp_path / "austen"
    manifest = prepare(PrepareOptions([str(austen)], str(out), tokenizer="bytes", seq_len=1024,
                                      val_fraction=0.005, doc_chars=2000), log=lambda _: None)
    tok = load_tokenizer("bytes")
    docs = [d for b in sorted(austen.glob("*.txt")) for d in read_documents(str(b), "text", 2000)]
    chosen = [text for doc_id, text in docs if is_validation(doc_id, 1234, 0.005)]
    tokens = sum(len(ids) + 1 for ids in tok.encode_batch(chosen))
    validation = manifest["splits"]["validation"]
    assert validation["documents"] == len(chosen) >= 5 and validation["tokens"] == tokens
    kept = validation["sequences"] * 1025
    assert kept >= 0.95 * tokens and tokens - kept == validation["dropped_tokens"] < 1025
    data = PreparedDataset.open(str(out))
    assert len(all_sequences(data, "validation")) == validation["sequences"]


def test_corrupt_shard_and_out_of_range_tokens_are_named(split_dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(split_dataset, copy)
    dataset = PreparedDataset.open(str(copy))
    shard = dataset.shards("train")[0]
    path = copy / shard.path
    # bytes of a row group's token data: the file's middle byte may be in a page header's
    # statistics, which reading never uses
    metadata = pq.ParquetFile(path).metadata
    chunk = metadata.row_group(metadata.num_row_groups // 2).column(0)
    start = chunk.data_page_offset + 3 * chunk.total_compressed_size // 4
    data = bytearray(path.read_bytes())
    for i in range(start, start + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"shard .*{shard.path}: row group \\d+.*checksum does not match"):
        dataset.read_shard(shard)
    with pytest.raises(DatasetError, match="checksum does not match"):
        with SequenceReader(dataset, "train", 0, 1, 1, seed=0, shuffle=False) as reader:
            for _ in range(dataset.manifest["splits"]["train"]["sequences"]):
                reader.next_batch(1)
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

    books = sorted((REPO / "raymoe" / "sample" / "corpus").glob("*.txt"))[:2]  # shipped: no skip
    texts = [decode_text(b.read_bytes(), str(b)) for b in books]
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
