"""Token shards on real Japanese text: Megatron indexed datasets, the encode step, shard sets."""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor

from common.errors import KinoeError
from tokenizer.encode import DocumentReader, EncodeShards, assemble_shard_sets
from tokenizer.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    dtype_for_vocab,
    open_shard_set,
    tokenizer_sha256,
)

from conftest import SHARED_DATA

VOCAB_SIZE = 3000
EOS_ID = 2


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_megatron(prefix: Path) -> dict:
    """An independent reader, from the format description alone (no tokenizer.indexed)."""
    index = Path(f"{prefix}.idx").read_bytes()
    magic, version, code, sequences, document_count = struct.unpack("<9sQBQQ", index[:34])
    assert magic == b"MMIDIDX\x00\x00"
    assert version == 1
    dtype = np.dtype(
        {1: "<u1", 2: "<i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}[code]
    )
    offset = 34
    lengths = np.frombuffer(index, dtype="<i4", count=sequences, offset=offset)
    offset += 4 * sequences
    pointers = np.frombuffer(index, dtype="<i8", count=sequences, offset=offset)
    offset += 8 * sequences
    documents = np.frombuffer(index, dtype="<i8", count=document_count, offset=offset)
    offset += 8 * document_count
    assert offset == len(index)
    data = Path(f"{prefix}.bin").read_bytes()
    assert len(data) == int(lengths.sum()) * dtype.itemsize
    return {
        "code": code,
        "dtype": dtype,
        "document_indices": documents,
        "sequences": [
            np.frombuffer(data, dtype=dtype, count=int(length), offset=int(pointer))
            for length, pointer in zip(lengths, pointers, strict=True)
        ],
    }


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[dict]]:
    """Real documents by source: Wikipedia leads and web pages (module-wide ``shared_data``)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/SOURCES.md)")
    folder = SHARED_DATA / "corpus"
    return {
        "wikipedia": read_jsonl_gz(folder / "wikipedia_ja_leads.jsonl.gz"),
        "web": read_jsonl_gz(folder / "fineweb2_ja_web.jsonl.gz"),
    }


@pytest.fixture(scope="module")
def model(tmp_path_factory, corpus) -> tuple[Path, spm.SentencePieceProcessor]:
    """A small real unigram model trained on the Wikipedia leads."""
    folder = tmp_path_factory.mktemp("spm")
    training_text = folder / "leads.txt"
    with training_text.open("w", encoding="utf-8") as handle:
        for record in corpus["wikipedia"]:
            handle.write(record["text"] + "\n")
    spm.SentencePieceTrainer.train(
        input=str(training_text),
        model_prefix=str(folder / "ja"),
        vocab_size=VOCAB_SIZE,
        model_type="unigram",
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        # Web pages keep their spaces and newlines, so decoding gives back the exact text.
        remove_extra_whitespaces=False,
        # The leads have no spaces: without the whitespace piece, a space would fall back to
        # the bytes of "▁" and decode as "▁".
        required_chars="▁",
        unk_id=0,
        bos_id=1,
        eos_id=EOS_ID,
        pad_id=3,
        num_threads=2,
        minloglevel=2,
    )
    path = folder / "ja.model"
    return path, spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def leads_dataset(tmp_path_factory, corpus, model) -> dict:
    """Every lead, encoded with EOS and written by IndexedDatasetWriter."""
    _, processor = model
    texts = [record["text"] for record in corpus["wikipedia"]]
    encoded = [[*ids, EOS_ID] for ids in processor.encode(texts)]
    prefix = tmp_path_factory.mktemp("leads") / "leads"
    with IndexedDatasetWriter(prefix, processor.get_piece_size()) as writer:
        for ids in encoded:
            writer.add_document(ids)
    return {"prefix": prefix, "texts": texts, "encoded": encoded, "writer": writer}


def test_round_trip_on_real_text(leads_dataset, model):
    _, processor = model
    prefix, texts, encoded = (
        leads_dataset["prefix"],
        leads_dataset["texts"],
        leads_dataset["encoded"],
    )
    writer = leads_dataset["writer"]
    total = sum(len(ids) for ids in encoded)
    assert writer.documents == len(texts)
    assert writer.tokens == total
    assert sorted(path.name for path in prefix.parent.iterdir()) == ["leads.bin", "leads.idx"]

    dataset = IndexedDataset(prefix)
    assert len(dataset) == dataset.documents == len(texts)
    assert dataset.dtype == np.uint16
    assert dataset.num_tokens == total
    assert dataset.sequence_lengths.tolist() == [len(ids) for ids in encoded]
    assert np.array_equal(dataset.document_indices, np.arange(len(texts) + 1))
    for index, (text, ids) in enumerate(zip(texts, encoded, strict=True)):
        sequence = dataset[index]
        assert sequence.tolist() == ids
        assert sequence[-1] == EOS_ID
        assert processor.decode(sequence[:-1].tolist()) == text
    assert dataset[-1].tolist() == encoded[-1]
    assert dataset.get(5, offset=2, length=3).tolist() == encoded[5][2:5]
    assert dataset.get(5, offset=2).tolist() == encoded[5][2:]
    with pytest.raises(IndexError):
        dataset[len(texts)]
    with pytest.raises(IndexError):
        dataset.get(5, offset=1, length=len(encoded[5]))


def test_independent_reader_agrees(leads_dataset):
    independent = read_megatron(leads_dataset["prefix"])
    assert independent["code"] == 8
    assert np.array_equal(
        independent["document_indices"], np.arange(len(leads_dataset["texts"]) + 1)
    )
    assert [sequence.tolist() for sequence in independent["sequences"]] == leads_dataset["encoded"]


def test_dtype_follows_vocabulary_size(tmp_path):
    assert dtype_for_vocab(VOCAB_SIZE) == np.uint16
    assert dtype_for_vocab(65_499) == np.uint16
    assert dtype_for_vocab(65_500) == np.int32
    documents = [[0, 65_535, 65_536, 70_000, EOS_ID], [12, 65_499, EOS_ID], [EOS_ID]]
    with IndexedDatasetWriter(tmp_path / "big", vocab_size=70_001) as writer:
        for ids in documents:
            writer.add_document(np.array(ids))
    dataset = IndexedDataset(tmp_path / "big")
    assert dataset.dtype == np.int32
    assert [dataset[index].tolist() for index in range(len(dataset))] == documents
    independent = read_megatron(tmp_path / "big")
    assert independent["code"] == 4
    assert [sequence.tolist() for sequence in independent["sequences"]] == documents


def test_out_of_range_ids_are_refused_and_leave_nothing(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "small", vocab_size=100)
    writer.add_document([5, 99])
    with pytest.raises(ValueError, match="token id 100 is outside the vocabulary"):
        writer.add_document([5, 100])
    with pytest.raises(ValueError, match="token id -1"):
        writer.add_document(np.array([-1, 5]))
    with pytest.raises(ValueError, match="integers"):
        writer.add_document([1.5])
    assert (writer.documents, writer.tokens) == (1, 2)
    # Nothing under the final names until finalize.
    assert not (tmp_path / "small.bin").exists() and not (tmp_path / "small.idx").exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ValueError), IndexedDatasetWriter(tmp_path / "crash", 100) as crashing:
        crashing.add_document([1, 2, 3])
        crashing.add_document([300])
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def encoded_sets(tmp_path_factory, corpus, model) -> dict:
    """Real documents of two sources read and encoded as `kinoe tokenizer encode` does, in a
    2-task datatrove pipeline."""
    model_path, processor = model
    root = tmp_path_factory.mktemp("encode")
    records = [
        {"id": record["id"], "text": record["text"], "source": source}
        for source, documents in corpus.items()
        for record in documents
    ]
    # Both files mix both sources, so each source gets a shard from each task.
    (root / "input").mkdir()
    write_jsonl_gz(root / "input" / "part-0.jsonl.gz", records[0::2])
    write_jsonl_gz(root / "input" / "part-1.jsonl.gz", records[1::2])
    output = root / "tokens"
    LocalPipelineExecutor(
        [
            DocumentReader(root / "input", root / "read", "encode.documents"),
            EncodeShards(str(model_path), str(output), batch_size=64),
        ],
        tasks=2,
        workers=2,
        logging_dir=str(root / "logs"),
    ).run()
    sha = tokenizer_sha256(model_path)
    metadata = assemble_shard_sets(output, sha, processor.get_piece_size(), processor.eos_id())
    return {"output": output, "sha": sha, "metadata": metadata}


def test_pipeline_shards_decode_to_the_input_texts(encoded_sets, corpus, model):
    _, processor = model
    output, sha, metadata = encoded_sets["output"], encoded_sets["sha"], encoded_sets["metadata"]
    assert sorted(metadata) == ["web", "wikipedia"]
    for source, documents in corpus.items():
        datasets = open_shard_set(output / source, sha)
        assert len(datasets) == 2
        decoded, tokens = [], 0
        for dataset in datasets:
            for index in range(len(dataset)):
                sequence = dataset[index]
                assert sequence[-1] == EOS_ID
                decoded.append(processor.decode(sequence[:-1].tolist()))
            tokens += dataset.num_tokens
        assert Counter(decoded) == Counter(record["text"] for record in documents)

        on_disk = json.loads((output / source / "shards.json").read_text())
        assert on_disk == metadata[source]
        assert on_disk["format"] == "megatron-mmidx-v1"
        assert on_disk["source"] == source
        assert on_disk["tokenizer_sha256"] == sha
        assert (on_disk["vocab_size"], on_disk["eos_id"], on_disk["dtype"]) == (
            VOCAB_SIZE,
            EOS_ID,
            "uint16",
        )
        assert [shard["prefix"] for shard in on_disk["shards"]] == ["00000", "00001"]
        assert on_disk["documents"] == len(documents)
        assert on_disk["tokens"] == tokens == sum(shard["tokens"] for shard in on_disk["shards"])
        for shard in on_disk["shards"]:
            tally = json.loads((output / source / f"{shard['prefix']}.json").read_text())
            assert tally == {"documents": shard["documents"], "tokens": shard["tokens"]}


def test_wrong_tokenizer_is_refused_in_one_line(encoded_sets):
    directory, sha = encoded_sets["output"] / "web", encoded_sets["sha"]
    other = "0123456789abcdef" * 4
    with pytest.raises(KinoeError) as caught:
        open_shard_set(directory, other)
    message = str(caught.value)
    assert "\n" not in message
    assert str(directory) in message
    assert sha[:12] in message and other[:12] in message
    assert sha not in message and other not in message
    assert "kinoe tokenizer encode" in message


def test_missing_pieces_of_a_shard_set_are_refused(encoded_sets, tmp_path):
    copy = tmp_path / "wikipedia"
    shutil.copytree(encoded_sets["output"] / "wikipedia", copy)
    (copy / "00001.bin").unlink()
    with pytest.raises(KinoeError, match=r"00001\.bin: listed in .*shards\.json but missing"):
        open_shard_set(copy, encoded_sets["sha"])
    (copy / "shards.json").unlink()
    with pytest.raises(KinoeError, match=r"no shards\.json"):
        open_shard_set(copy, encoded_sets["sha"])


def test_corrupt_magic_is_refused(encoded_sets, tmp_path):
    copy = tmp_path / "web"
    shutil.copytree(encoded_sets["output"] / "web", copy)
    index = copy / "00000.idx"
    index.write_bytes(b"NOTMMIDX\x00" + index.read_bytes()[9:])
    with pytest.raises(KinoeError) as caught:
        open_shard_set(copy, encoded_sets["sha"])
    message = str(caught.value)
    assert "\n" not in message
    assert str(index) in message and "magic" in message


def test_assembly_checks_the_task_tallies(encoded_sets, tmp_path):
    copy = tmp_path / "tokens"
    shutil.copytree(encoded_sets["output"], copy)
    tally = copy / "web" / "00000.json"
    counts = json.loads(tally.read_text())
    tally.write_text(json.dumps({**counts, "documents": counts["documents"] + 1}))
    with pytest.raises(KinoeError, match=r"00000\.idx: .* but 00000\.json reports"):
        assemble_shard_sets(copy, encoded_sets["sha"], VOCAB_SIZE, EOS_ID)
    tally.write_text(json.dumps(counts))
    (copy / "web" / "00000.idx").unlink()
    with pytest.raises(KinoeError, match=r"00000\.idx: missing"):
        assemble_shard_sets(copy, encoded_sets["sha"], VOCAB_SIZE, EOS_ID)


def test_document_without_source_is_refused(model, tmp_path):
    model_path, _ = model
    step = EncodeShards(str(model_path), str(tmp_path / "tokens"), batch_size=2)
    documents = [
        Document(text="東京は日本の首都である。", id="first", metadata={"source": "wikipedia"}),
        Document(text="出典のない文書。", id="orphan-7", metadata={}),
    ]
    with pytest.raises(ValueError, match="orphan-7"):
        list(step.run(iter(documents), rank=0))
    # The unfinished shard of the first document is gone, and no tally claims it.
    assert [path for path in (tmp_path / "tokens").rglob("*") if path.is_file()] == []


def test_step_pickles_without_the_processor(model, tmp_path):
    model_path, processor = model
    step = EncodeShards(str(model_path), str(tmp_path / "tokens"))
    assert step.processor.get_piece_size() == VOCAB_SIZE
    copy = pickle.loads(pickle.dumps(step))
    assert copy._processor is None
    text = "アムステルダムは、オランダの首都。"
    assert list(copy.run(iter([Document(text=text, id="a", metadata={"source": "s"})]))) == []
    dataset = IndexedDataset(tmp_path / "tokens" / "s" / "00000")
    assert dataset[0].tolist() == [*processor.encode(text), EOS_ID]
