"""kinoe data end to end on real Japanese corpora with planted duplicates and bad input."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import yaml

from common.errors import ConfigError, KinoeError
from common.run import load_stage_config, run_stage
from data_prep.cli import STAGE
from data_prep.config import DataConfig

FIFTY_MB = 50 * 2**20
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def documents_in(folder: Path) -> list[dict]:
    return [record for path in sorted(folder.glob("*.jsonl.gz")) for record in read_jsonl_gz(path)]


def edit_a_few_characters(text: str, rng: random.Random) -> str:
    """A near copy: three characters replaced and a short sentence appended."""
    characters = list(text)
    for position in rng.sample(range(10, len(characters) - 10), 3):
        characters[position] = "あ"
    return "".join(characters) + "以上。"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, request) -> dict:
    """Real corpora plus planted copies and every kind of bad input, as kinoe sources."""
    shared = SHARED
    if not shared.is_dir():
        pytest.skip(f"real data folder {shared} is absent (see ../shared/data/SOURCES.md)")
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(7)
    (root / "wiki").mkdir()
    shutil.copy(shared / "corpus" / "wikipedia_ja_leads.jsonl.gz", root / "wiki")
    (root / "aozora").mkdir()
    shutil.copy(shared / "corpus" / "aozora" / "card000081.tar.gz", root / "aozora")

    # Real web pages: seven become planted originals (and leave the web source), one is copied
    # into the planted source as a duplicate across sources.
    web = read_jsonl_gz(shared / "corpus" / "fineweb2_ja_web.jsonl.gz")
    long_pages = sorted((d for d in web if 800 <= len(d["text"]) <= 1200), key=lambda d: d["id"])[
        :8
    ]
    used = {page["id"] for page in long_pages[:6] + long_pages[7:8]}
    (root / "web").mkdir()
    with gzip.open(root / "web" / "fineweb2_ja_web.jsonl.gz", "wt", encoding="utf-8") as handle:
        for page in web:
            if page["id"] not in used:
                handle.write(json.dumps(page, ensure_ascii=False) + "\n")
    # A UT1-style list naming the parent domain of one remaining page's host.
    kept_web = [page for page in web if page["id"] not in used]
    host = sorted(page["url"].split("/")[2] for page in kept_web)[0]
    blocked = ".".join(host.split(".")[-2:])
    (root / "blocklist" / "adult").mkdir(parents=True)
    (root / "blocklist" / "adult" / "domains").write_text(f"{blocked}\n", encoding="utf-8")
    planted, near_pairs, exact_pairs = [], [], []
    for index, page in enumerate(long_pages[:4]):
        planted.append({"id": f"orig-{index}", "text": page["text"]})
        planted.append({"id": f"near-{index}", "text": edit_a_few_characters(page["text"], rng)})
        near_pairs.append((f"orig-{index}", f"near-{index}"))
    for index, page in enumerate(long_pages[4:6]):
        planted.append({"id": f"twin-a-{index}", "text": page["text"]})
        planted.append({"id": f"twin-b-{index}", "text": page["text"]})
        exact_pairs.append((f"twin-a-{index}", f"twin-b-{index}"))
    planted.append({"id": "cross-source", "text": long_pages[6]["text"]})
    # A cluster of four input documents: a page, its exact copy, a near copy and that copy's
    # exact copy; the one kept stands for all four (minhash_cluster_size 4).
    near_copy = edit_a_few_characters(long_pages[7]["text"], rng)
    for name, text in (("a", long_pages[7]["text"]), ("b", near_copy)):
        planted += [{"id": f"four-{name}", "text": text}, {"id": f"four-{name}-copy", "text": text}]
    # Distinct documents that MinHash alone would merge (issue 19): a short lead and the same
    # lead about another place (exact dedup only below minhash.min_chars), and a long text
    # sharing 82% of another (Jaccard about 0.7: a likely band candidate, rejected on verification).
    leads = [d["text"] for d in read_jsonl_gz(shared / "corpus" / "wikipedia_ja_leads.jsonl.gz")]
    short = next(t for t in leads if 60 <= len(t) < 90 and "県" in t)
    planted.append({"id": "short-a", "text": short.replace("県", "州", 1)})
    planted.append({"id": "short-b", "text": short.replace("県", "府", 1)})
    long_text = "".join(leads[100:130])
    cut = int(len(long_text) * 0.82)
    planted.append({"id": "overlap-a", "text": long_text})
    planted.append(
        {
            "id": "overlap-b",
            "text": long_text[:cut] + "".join(leads[300:340])[: len(long_text) - cut],
        }
    )
    (root / "planted").mkdir()
    with (root / "planted" / "copies.jsonl").open("w", encoding="utf-8") as handle:
        for record in planted:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    # Read by the second task, which has no duplicate to remove: its kept documents still need
    # a cluster size (datatrove's cluster step wrote none for such a task).
    unique = [
        {"id": f"unique-{i}", "text": "".join(leads[500 + 10 * i : 510 + 10 * i])} for i in range(3)
    ]
    with (root / "planted" / "unique.jsonl").open("w", encoding="utf-8") as handle:
        for record in unique:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    (root / "bad").mkdir()
    lead = read_jsonl_gz(shared / "corpus" / "wikipedia_ja_leads.jsonl.gz")[0]["text"]
    junk = bytes(b for b in os.urandom(3000) if b not in (10, 13))
    with (root / "bad" / "mixed.jsonl").open("wb") as handle:
        handle.write(
            b'{"id": "broken", "text": "\xe9\x96\x89\xe3\x81\x98\xe3\x81\xa6\xe3\x81\x84\xe3\x81\xaa\xe3\x81\x84\n'
        )
        handle.write(b'{"id": "latin1", "text": "caf\xe9"}\n')
        handle.write(junk + b"\n")
        handle.write(json.dumps({"id": "empty", "text": ""}).encode() + b"\n")
        handle.write(json.dumps({"id": "blank", "text": " \n\u3000\t "}).encode() + b"\n")
        handle.write(
            json.dumps({"id": "no-text", "body": lead}, ensure_ascii=False).encode() + b"\n"
        )
        handle.write(json.dumps({"id": "number", "text": 42}).encode() + b"\n")
        handle.write(b"[1, 2, 3]\n")
        huge = (lead * (FIFTY_MB // len(lead.encode()) + 1))[: FIFTY_MB // 3]
        handle.write(json.dumps({"id": "huge", "text": huge}, ensure_ascii=False).encode() + b"\n")
    sjis_lines = [
        json.dumps({"id": f"sjis-{i}", "text": t}, ensure_ascii=False)
        for i, t in enumerate([lead, lead[::-1]])
    ]
    (root / "bad" / "shift_jis.jsonl").write_bytes(
        ("\n".join(sjis_lines) + "\n").encode("cp932", errors="replace")
    )
    return {
        "root": root,
        "near_pairs": near_pairs,
        "exact_pairs": exact_pairs,
        "wiki_docs": 2022,
        "web_docs": len(web) - len(used),
        "cross_source_pair": (long_pages[6]["id"], "cross-source"),
        "distinct_similar": ["short-a", "short-b", "overlap-a", "overlap-b"],
        "blocklist": root / "blocklist" / "adult" / "domains",
        "blocked_ids": {
            page["id"] for page in kept_web if page["url"].split("/")[2].endswith(blocked)
        },
        "planted_docs": len(planted) + len(unique),
        "cluster_of_four": {"four-a", "four-a-copy", "four-b", "four-b-copy"},
        "unique_ids": {record["id"] for record in unique},
        "bad_lines": 9 + len(sjis_lines),
    }


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory) -> dict:
    """One complete local run over the corpus fixture."""
    root = corpus["root"]
    runs = tmp_path_factory.mktemp("runs")
    config = {
        "run": {"root": str(runs), "name": "real"},
        "sources": [
            {
                "name": "wikipedia",
                "kind": "jsonl",
                "path": str(root / "wiki"),
                "preset": "wikipedia",
            },
            {
                "name": "web",
                "kind": "jsonl",
                "path": str(root / "web"),
                "url_blocklist": [str(corpus["blocklist"])],
            },
            {
                "name": "planted",
                "kind": "jsonl",
                "path": str(root / "planted"),
                "preset": "wikipedia",
            },
            {"name": "bad", "kind": "jsonl", "path": str(root / "bad")},
            {"name": "aozora", "kind": "aozora", "path": str(root / "aozora")},
        ],
        "executor": {"tasks": 2, "workers": 2},
    }
    path = runs / "real.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    result = run_stage(STAGE, load_stage_config(DataConfig, path))
    return {"result": result, "config_path": path, "run_dir": result.run_dir}


def test_run_completes_with_a_balanced_funnel(finished, corpus):
    result = finished["result"]
    assert result.status == "complete" and result.manifest.status == "complete"
    report = json.loads((finished["run_dir"] / "report" / "report.json").read_text())
    assert report["balanced"] is True
    kept = len(documents_in(finished["run_dir"] / "documents"))
    removed = sum(row["removed_documents"] for row in report["steps"])
    assert report["documents_kept"] == kept
    assert report["documents_in"] == kept + removed
    minimum = (
        corpus["wiki_docs"] + corpus["web_docs"] + corpus["planted_docs"] + corpus["bad_lines"]
    )
    assert report["documents_in"] > minimum  # plus the Aozora works
    for name in ("report.md", "samples.md", "funnel.png", "lengths.png"):
        assert (finished["run_dir"] / "report" / name).stat().st_size > 0
    assert result.manifest.summary["balanced"] is True


def test_kept_documents_follow_the_contract(finished):
    documents = documents_in(finished["run_dir"] / "documents")
    assert documents
    for document in documents:
        assert set(document) == {"id", "text", "source", "metadata"}
        assert document["text"] and document["source"] in {"wikipedia", "web", "planted", "aozora"}
        assert document["metadata"]["minhash_cluster_size"] >= 1


def test_cluster_size_counts_every_exact_and_near_copy(finished, corpus):
    """A kept document's minhash_cluster_size is the number of input documents it stands for."""
    run_dir = finished["run_dir"]
    kept = {d["id"]: d["metadata"] for d in documents_in(run_dir / "documents")}
    four = [kept[i]["minhash_cluster_size"] for i in corpus["cluster_of_four"] if i in kept]
    assert four == [4]
    for pair in corpus["near_pairs"] + corpus["exact_pairs"] + [corpus["cross_source_pair"]]:
        assert [kept[i]["minhash_cluster_size"] for i in pair if i in kept] == [2], pair
    assert all(kept[i]["minhash_cluster_size"] == 1 for i in corpus["unique_ids"])
    # Every document the dedup steps removed is counted in exactly one kept document's size.
    report = json.loads((run_dir / "report" / "report.json").read_text())
    removed = {row["step"]: row["removed_documents"] for row in report["steps"]}
    represented = sum(metadata["minhash_cluster_size"] for metadata in kept.values())
    assert represented == len(kept) + removed["exact_dedup"] + removed["near_dedup"]
    assert report["dedup"]["documents_represented"] == represented
    assert report["dedup"]["kept_by_cluster_size"]["4"] >= 1


def test_wikipedia_leads_mostly_survive(finished, corpus):
    report = json.loads((finished["run_dir"] / "report" / "report.json").read_text())
    wiki = report["sources"]["wikipedia"]
    assert wiki["in"]["documents"] == corpus["wiki_docs"]
    assert wiki["kept"]["documents"] / wiki["in"]["documents"] > 0.75


def test_planted_near_and_exact_duplicates_are_removed_once(finished, corpus):
    run_dir = finished["run_dir"]
    kept = {d["id"] for d in documents_in(run_dir / "documents") if d["source"] == "planted"}
    near = {d["id"] for d in documents_in(run_dir / "removed" / "near_dedup")}
    exact = {d["id"] for d in documents_in(run_dir / "removed" / "exact_dedup")}
    for pair in corpus["near_pairs"]:
        assert len(set(pair) & kept) == 1 and len(set(pair) & near) == 1, pair
    for pair in corpus["exact_pairs"]:
        assert len(set(pair) & kept) == 1 and len(set(pair) & exact) == 1, pair
    everything_kept = {d["id"] for d in documents_in(run_dir / "documents")}
    assert len(set(corpus["cross_source_pair"]) & everything_kept) == 1
    assert len(set(corpus["cross_source_pair"]) & exact) == 1
    planted_ids = {i for pair in corpus["near_pairs"] + corpus["exact_pairs"] for i in pair}
    survivors = [d for d in documents_in(run_dir / "documents") if d["id"] in planted_ids]
    assert any(d["metadata"]["minhash_cluster_size"] > 1 for d in survivors)


def test_length_table_balances_bin_by_bin(finished):
    report = json.loads((finished["run_dir"] / "report" / "report.json").read_text())
    histogram = report["length_histogram"]
    assert sum(histogram["in"]) == report["documents_in"]
    assert histogram["in"] == [
        k + r for k, r in zip(histogram["kept"], histogram["removed"], strict=True)
    ]


def test_distinct_similar_documents_are_not_merged(finished, corpus):
    kept = {d["id"] for d in documents_in(finished["run_dir"] / "documents")}
    assert set(corpus["distinct_similar"]) <= kept
    report = json.loads((finished["run_dir"] / "report" / "report.json").read_text())
    pairs = report["dedup"]["minhash_pairs"]
    assert pairs["rejected"] >= 1 and pairs["verified"] >= len(corpus["near_pairs"])
    assert pairs["candidates"] == pairs["verified"] + pairs["rejected"]


def test_bad_input_is_counted_under_named_reasons(finished):
    report = json.loads((finished["run_dir"] / "report" / "report.json").read_text())
    steps = {row["step"]: row for row in report["steps"]}
    reasons = steps["read_errors"]["reasons"]
    assert reasons["invalid_utf8"] >= 3  # the Latin-1 line, the binary junk, the Shift_JIS file
    assert reasons["malformed_json"] >= 1
    assert reasons["missing_text_field"] == 1 and reasons["text_not_a_string"] == 1
    assert reasons["not_an_object"] == 1
    removed_for_length = {
        d["id"]: d for d in documents_in(finished["run_dir"] / "removed" / "length")
    }
    assert {"empty", "blank", "huge"} <= set(removed_for_length)
    assert len(removed_for_length["huge"]["text"]) > 10_000_000  # kept whole for review
    assert report["sources"]["bad"]["kept"]["documents"] == 0


def test_rerun_is_skipped(finished):
    again = run_stage(STAGE, load_stage_config(DataConfig, finished["config_path"]))
    assert again.status == "skipped"


def test_hub_sources_resolve_to_hub_folders_and_local_mirrors():
    config = DataConfig.model_validate(
        {
            "sources": [
                {"name": "mc4", "kind": "c4_ja"},
                {"name": "wiki", "kind": "wikipedia_ja", "wikipedia_dump": "20231101.ja"},
                {"name": "mirror", "kind": "c4_ja", "path": "/data/c4/multilingual"},
            ]
        }
    )
    mc4, wiki, mirror = config.sources
    assert (mc4.folder(), mc4.file_glob()) == (
        "hf://datasets/allenai/c4/multilingual",
        "c4-ja.tfrecord-*.json.gz",
    )
    assert (wiki.folder(), wiki.file_glob()) == (
        "hf://datasets/wikimedia/wikipedia/20231101.ja",
        "*.parquet",
    )
    assert (
        mirror.folder() == "/data/c4/multilingual"
        and mirror.file_glob() == "c4-ja.tfrecord-*.json.gz"
    )
    assert (
        mc4.filters.length.min_chars > wiki.filters.length.min_chars
    )  # web strict, Wikipedia relaxed
    assert config.local_inputs() == {"sources.2.path": Path("/data/c4/multilingual")}


def test_local_mirrors_of_hub_layouts_are_read(corpus, tmp_path):
    """c4-ja JSON lines and a wikimedia/wikipedia Parquet dump, laid out as on the Hub."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    web = read_jsonl_gz(corpus["root"] / "web" / "fineweb2_ja_web.jsonl.gz")[:20]
    c4 = tmp_path / "c4" / "multilingual"
    c4.mkdir(parents=True)
    with gzip.open(c4 / "c4-ja.tfrecord-00000-of-01024.json.gz", "wt", encoding="utf-8") as handle:
        for page in web:
            handle.write(
                json.dumps(
                    {"text": page["text"], "timestamp": page["date"], "url": page["url"]},
                    ensure_ascii=False,
                )
                + "\n"
            )
    leads = read_jsonl_gz(corpus["root"] / "wiki" / "wikipedia_ja_leads.jsonl.gz")[:30]
    dump = tmp_path / "wikipedia" / "20231101.ja"
    dump.mkdir(parents=True)
    table = pa.table(
        {
            "id": [str(i) for i in range(len(leads))],
            "url": [f"https://ja.wikipedia.org/wiki?curid={i}" for i in range(len(leads))],
            "title": [f"title {i}" for i in range(len(leads))],
            "text": [lead["text"] for lead in leads],
        }
    )
    pq.write_table(table, dump / "train-00000-of-00001.parquet")
    config = DataConfig.model_validate(
        {
            "run": {"root": str(tmp_path / "runs"), "name": "mirrors"},
            "sources": [
                {"name": "mc4", "kind": "c4_ja", "path": str(c4)},
                {"name": "wiki", "kind": "wikipedia_ja", "path": str(dump)},
            ],
            "executor": {"tasks": 1},
            "dedup": {"minhash": {"enabled": False}},
        }
    )
    result = run_stage(STAGE, config)
    report = json.loads((result.run_dir / "report" / "report.json").read_text())
    assert report["sources"]["mc4"]["in"]["documents"] == 20
    assert report["sources"]["wiki"]["in"]["documents"] == 30
    kept = documents_in(result.run_dir / "documents")
    wiki_kept = [d for d in kept if d["source"] == "wiki"]
    assert wiki_kept and wiki_kept[0]["metadata"]["url"].startswith("https://ja.wikipedia.org/")
    assert any(
        d["metadata"].get("url", "").startswith("http") for d in kept if d["source"] == "mc4"
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "sources.0.filters.characters.min_hiragana=0.1",
            "unknown key 'sources.0.filters.characters.min_hiragana'",
        ),
        ("sources.0.kind=csv", "'sources.0.kind'"),
        ("executor.kind=slurm", "executor.slurm.partition is empty"),
        ("sources.0.path=", "needs a path to read"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path, override, expected):
    path = Path(__file__).resolve().parent.parent / "configs" / "data" / "quickstart.yaml"
    with pytest.raises(ConfigError) as caught:
        load_stage_config(DataConfig, path, [override])
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_source_without_matching_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    config = DataConfig.model_validate(
        {
            "run": {"root": str(tmp_path / "runs"), "name": "none"},
            "sources": [{"name": "web", "kind": "jsonl", "path": str(tmp_path / "empty")}],
        }
    )
    with pytest.raises(
        KinoeError,
        match=r"source 'web' has no files matching .* fix sources.0.path or sources.0.glob",
    ):
        run_stage(STAGE, config)


def test_every_aozora_work_is_read_and_most_are_kept(finished, corpus):
    with tarfile.open(corpus["root"] / "aozora" / "card000081.tar.gz") as archive:
        works = [m for m in archive.getmembers() if m.name.endswith(".txt")]
    report = json.loads((finished["run_dir"] / "report" / "report.json").read_text())
    aozora = report["sources"]["aozora"]
    assert aozora["in"]["documents"] == len(works)
    assert aozora["kept"]["documents"] > len(works) // 2
    kept = [d for d in documents_in(finished["run_dir"] / "documents") if d["source"] == "aozora"]
    assert not any("《" in d["text"] or "［＃" in d["text"] for d in kept)


def test_quickstart_command_runs_and_reruns_are_skipped(kinoe, tmp_path):
    first = kinoe("data", "-c", "configs/data/quickstart.yaml", f"run.root={tmp_path / 'runs'}")
    assert first.returncode == 0, first.stderr[-2000:]
    report = tmp_path / "runs" / "data" / "quickstart" / "report" / "report.json"
    funnel = json.loads(report.read_text())
    assert funnel["balanced"] and funnel["documents_in"] == 143
    # The bundled corpus gives every filter and both dedup steps some work.
    assert all(
        row["removed_documents"] > 0 for row in funnel["steps"] if row["step"] != "read_errors"
    )
    second = kinoe("data", "-c", "configs/data/quickstart.yaml", f"run.root={tmp_path / 'runs'}")
    assert second.returncode == 0 and "skipped" in second.stderr


def test_parquet_output_follows_the_contract_and_feeds_the_tokenizer(tmp_path):
    import pyarrow.parquet as pq

    from tokenizer.config import SampleConfig
    from tokenizer.sample import write_sample

    quickstart = Path(__file__).resolve().parent.parent / "data_prep" / "quickstart"
    config = DataConfig.model_validate(
        {
            "run": {"root": str(tmp_path / "runs"), "name": "parquet"},
            "sources": [
                {"name": "web", "kind": "jsonl", "path": str(quickstart), "glob": "web.jsonl"}
            ],
            "output": {"format": "parquet"},
            "executor": {"tasks": 1},
        }
    )
    result = run_stage(STAGE, config)
    files = sorted((result.run_dir / "documents").glob("*.parquet"))
    assert files
    rows = [row for path in files for row in pq.read_table(path).to_pylist()]
    assert len(rows) == result.manifest.summary["documents_kept"] > 0
    assert set(rows[0]) == {"id", "text", "source", "metadata"}
    assert json.loads(rows[0]["metadata"])["filter_scores"]  # metadata travels as a JSON string
    stats = write_sample(
        SampleConfig(
            documents=result.run_dir / "documents", character_budget=10_000, held_out_fraction=0.05
        ),
        4192,
        tmp_path / "sample.txt",
        tmp_path / "held_out.jsonl",
    )
    assert sum(stats.characters.values()) >= 10_000 and stats.documents["web"] > 0


def test_inputs_are_the_files_a_source_reads_not_its_whole_folder(tmp_path):
    """A README or another source's files beside the data do not change the run's fingerprint."""
    (tmp_path / "web.jsonl").write_text('{"text": "本文"}\n', encoding="utf-8")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "more.jsonl.gz").write_bytes(b"")
    (tmp_path / "README.md").write_text("about the data\n", encoding="utf-8")
    config = DataConfig.model_validate(
        {
            "sources": [
                {"name": "web", "kind": "jsonl", "path": str(tmp_path), "glob": "web.jsonl"},
                {"name": "all", "kind": "jsonl", "path": str(tmp_path)},
                {"name": "none", "kind": "jsonl", "path": str(tmp_path), "glob": "*.parquet"},
            ]
        }
    )
    assert config.local_inputs() == {
        "sources.0.path/web.jsonl": tmp_path / "web.jsonl",
        "sources.1.path/nested/more.jsonl.gz": tmp_path / "nested" / "more.jsonl.gz",
        "sources.1.path/web.jsonl": tmp_path / "web.jsonl",
        "sources.2.path": tmp_path,
    }


def test_blocklisted_domains_are_removed_and_web_pii_is_masked(finished, corpus):
    run_dir = finished["run_dir"]
    blocked = {d["id"]: d for d in documents_in(run_dir / "removed" / "url_blocklist")}
    assert set(blocked) == corpus["blocked_ids"] and blocked
    assert all(d["metadata"]["filter_reason"].startswith("adult ") for d in blocked.values())
    report = json.loads((run_dir / "report" / "report.json").read_text())
    row = next(r for r in report["steps"] if r["step"] == "url_blocklist")
    assert row["removed_documents"] == len(blocked) and row["reasons"] == {"adult": len(blocked)}
    # Real FineWeb-2 pages carry office phone numbers; the web preset masks them.
    assert report["pii_masked"]["phone"] >= 1 and report["pii_masked"]["documents"] >= 1
    masked = [
        d
        for folder in (run_dir / "documents", *(run_dir / "removed").iterdir())
        for d in documents_in(folder)
        if d["metadata"].get("pii_masked")
    ]
    assert masked and all(d["source"] == "web" for d in masked)
    assert all("[PHONE]" in d["text"] or "[EMAIL]" in d["text"] for d in masked)


def test_nothing_readable_is_one_line_and_nothing_kept_is_a_run(tmp_path):
    """Issue 19: no readable record names the source and why; all removed by filters completes."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jsonl").write_bytes(b"")
    (bad / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (bad / "no_text.jsonl").write_text('{"id": 1, "body": "本文"}\n', encoding="utf-8")
    (bad / "cut.jsonl.gz").write_bytes(gzip.compress('{"text": "あ"}\n'.encode())[:12])

    def run(folder: Path, name: str):
        config = DataConfig.model_validate(
            {
                "run": {"root": str(tmp_path / "runs"), "name": name},
                "sources": [{"name": "bad", "kind": "jsonl", "path": str(folder)}],
                "executor": {"tasks": 1, "workers": 1},
            }
        )
        return run_stage(STAGE, config)

    with pytest.raises(KinoeError) as caught:
        run(bad, "unreadable")
    message = str(caught.value)
    assert "\n" not in message and "no input record was readable" in message
    assert "source 'bad'" in message and "3 records read" in message
    for reason in ("corrupt_file 1", "invalid_utf8 1", "missing_text_field 1"):
        assert reason in message

    short = tmp_path / "short"
    short.mkdir()
    (short / "a.jsonl").write_text('{"text": "短い。"}\n', encoding="utf-8")
    result = run(short, "all-removed")
    report = json.loads((result.run_dir / "report" / "report.json").read_text())
    assert report["documents_in"] == 1 and report["documents_kept"] == 0 and report["balanced"]


def encode_kept(run_dir: Path, output: Path, rehydrate=None) -> dict:
    """The kept planted and web documents through EncodeShards (one task) with the real Mistral
    tokenizer; the assembled shard sets by source."""
    import sentencepiece as spm
    from datatrove.data import Document

    from tokenizer.encode import EncodeShards, assemble_shard_sets
    from tokenizer.indexed import tokenizer_sha256

    model = SHARED / "tokenizers" / "mistral-7b-v0.1.model"
    documents = [
        Document(text=d["text"], id=d["id"], metadata={**d["metadata"], "source": d["source"]})
        for d in documents_in(run_dir / "documents")
        if d["source"] in ("planted", "web")
    ]
    step = EncodeShards(str(model), str(output), rehydrate=rehydrate)
    list(step.run(iter(documents), rank=0))
    processor = spm.SentencePieceProcessor(model_file=str(model))
    sha = tokenizer_sha256(model)
    return {
        "sets": assemble_shard_sets(output, sha, processor.get_piece_size(), processor.eos_id()),
        "sha": sha,
        "processor": processor,
        "documents": documents,
    }


def sequences_of(prefix: Path) -> list[list[int]]:
    """Every document of one shard, in order, as lists of token ids."""
    from tokenizer.indexed import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_encoding_without_rehydration_writes_each_document_once(finished, tmp_path):
    """Off by default: the shards are exactly each kept document encoded once, in input order."""
    from tokenizer.indexed import IndexedDatasetWriter

    encoded = encode_kept(finished["run_dir"], tmp_path / "tokens")
    processor = encoded["processor"]
    for source in ("planted", "web"):
        metadata = encoded["sets"][source]
        assert "rehydration" not in metadata and [s["prefix"] for s in metadata["shards"]] == [
            "00000"
        ]
        texts = [d.text for d in encoded["documents"] if d.metadata["source"] == source]
        expected = tmp_path / "expected" / source
        with IndexedDatasetWriter(expected, processor.get_piece_size()) as writer:
            for ids in processor.encode(texts):
                writer.add_document([*ids, processor.eos_id()])
        for suffix in (".bin", ".idx"):
            written = tmp_path / "tokens" / source / f"00000{suffix}"
            assert written.read_bytes() == Path(f"{expected}{suffix}").read_bytes()
        tally = json.loads((tmp_path / "tokens" / source / "00000.json").read_text())
        assert tally == {"documents": len(texts), "tokens": metadata["tokens"]}


def test_rehydration_repeats_documents_by_cluster_size(finished, corpus, tmp_path):
    """FineWeb-2's weights on planted clusters: the document standing for four is written three
    times, pairs twice, unique documents once; copies lie in separate shards, after every original."""
    from tokenizer.config import RehydrateConfig

    rehydrate = RehydrateConfig(sources=["planted"])
    off = encode_kept(finished["run_dir"], tmp_path / "off")
    on = encode_kept(finished["run_dir"], tmp_path / "on", rehydrate)
    planted = {d.id: d for d in on["documents"] if d.metadata["source"] == "planted"}
    size = {i: d.metadata["minhash_cluster_size"] for i, d in planted.items()}
    (four,) = (i for i in corpus["cluster_of_four"] if i in planted)
    assert size[four] == 4 and rehydrate.copies_for(4) == 3

    metadata = on["sets"]["planted"]
    assert [s["prefix"] for s in metadata["shards"]] == ["00000", "00000.repeat1", "00000.repeat2"]
    expected_copies = Counter(str(rehydrate.copies_for(n)) for n in size.values())
    assert metadata["rehydration"]["documents_by_copies"] == dict(sorted(expected_copies.items()))
    assert metadata["rehydration"]["distinct_documents"] == len(planted)
    assert metadata["rehydration"]["distinct_tokens"] == off["sets"]["planted"]["tokens"]
    assert metadata["documents"] == sum(rehydrate.copies_for(n) for n in size.values())

    ids = [*on["processor"].encode(planted[four].text), on["processor"].eos_id()]
    on_shards = {
        prefix: sequences_of(tmp_path / "on" / "planted" / prefix)
        for prefix in ("00000", "00000.repeat1", "00000.repeat2")
    }
    # One copy per shard, and no shard holds a document twice: copies are a pass apart.
    assert [shard.count(ids) for shard in on_shards.values()] == [1, 1, 1]
    assert all(len({tuple(d) for d in shard}) == len(shard) for shard in on_shards.values())
    assert sequences_of(tmp_path / "off" / "planted" / "00000").count(ids) == 1
    # Its share of the source's tokens grows (0.10 to 0.18 here: the planted pairs doubled too),
    # and against a unique document it now weighs three to one.
    share_off = len(ids) / off["sets"]["planted"]["tokens"]
    share_on = 3 * len(ids) / metadata["tokens"]
    assert share_on > 1.5 * share_off
    unique = [*on["processor"].encode(planted["unique-0"].text), on["processor"].eos_id()]
    assert sum(shard.count(unique) for shard in on_shards.values()) == 1
    # A size that is not a count stops the task, naming the document.
    from datatrove.data import Document

    from tokenizer.encode import EncodeShards

    model = str(SHARED / "tokenizers" / "mistral-7b-v0.1.model")
    odd = Document(
        text="件数が文字列の文書。",
        id="odd",
        metadata={"source": "planted", "minhash_cluster_size": "3"},
    )
    with pytest.raises(ValueError, match=r"'odd' has minhash_cluster_size '3', not a whole"):
        list(EncodeShards(model, str(tmp_path / "odd"), rehydrate=rehydrate).run(iter([odd])))
    # A source not listed is written as before, byte for byte.
    for suffix in (".bin", ".idx"):
        assert (tmp_path / "on" / "web" / f"00000{suffix}").read_bytes() == (
            tmp_path / "off" / "web" / f"00000{suffix}"
        ).read_bytes()


def test_encode_stage_records_rehydration_and_refuses_unknown_sources(finished, tmp_path):
    """kinoe tokenizer encode with encode.rehydrate: figures in shards.json and the manifest."""
    from tokenizer.cli import STEPS, model_path, shards_path
    from tokenizer.config import TokenizerConfig

    documents = tmp_path / "documents"
    documents.mkdir()
    kept = [d for d in documents_in(finished["run_dir"] / "documents") if d["source"] == "planted"]
    with gzip.open(documents / "planted.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in kept)

    def config(documents: Path, sources: list[str], name: str = "rehydrated") -> TokenizerConfig:
        tokenizer = TokenizerConfig.model_validate(
            {
                "run": {"root": str(tmp_path / "runs"), "name": name},
                "sample": {"documents": str(documents)},
                "encode": {"rehydrate": {"sources": sources}},
                "executor": {"tasks": 1, "workers": 1},
            }
        )
        # The real Mistral model stands in for a trained one: encoding only needs a model.
        model_path(tokenizer).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED / "tokenizers" / "mistral-7b-v0.1.model", model_path(tokenizer))
        return tokenizer

    rehydrated = config(documents, ["planted"])
    result = run_stage(STEPS["encode"], rehydrated)
    figures = result.manifest.summary["rehydration"]["planted"]
    on_disk = json.loads((shards_path(rehydrated) / "planted" / "shards.json").read_text())
    assert on_disk["rehydration"] == figures
    sizes = Counter(d["metadata"]["minhash_cluster_size"] for d in kept)
    assert figures["distinct_documents"] == len(kept) and figures["without_cluster_size"] == 0
    assert result.manifest.summary["documents"]["planted"] == sum(
        count * {1: 1, 2: 2, 3: 3, 4: 3}[size] for size, count in sizes.items()
    )
    with pytest.raises(KinoeError) as caught:
        run_stage(STEPS["encode"], config(finished["run_dir"] / "documents", ["plant"], "typo"))
    message = str(caught.value)
    assert (
        "\n" not in message and "encode.rehydrate.sources: plant not among the sources" in message
    )
