"""PII masking and URL blocklists on real Japanese text and real web URLs from ../shared/data."""

from __future__ import annotations

import gzip
import json
import random
import re

import pytest
from datatrove.data import Document

from data_prep.pii import PLACEHOLDERS, PiiConfig, PiiMasker, luhn_valid, mask_pii, pii_counts
from data_prep.url_blocklist import UrlBlocklistFilter, listed_domain, load_domains, url_host

# Planted into real text; each must disappear. Full-width digits are what Japanese pages write
# when the source keeps its text un-normalised.
PLANTED = {
    "email": ["yamada.taro@example.co.jp", "info+news@mail.example.com", "sato＠example.jp"],
    "phone": [
        "03-1234-5678",
        "090-1234-5678",
        "0120-123-456",
        "(06)1234-5678",
        "+81-3-1234-5678",
        "０９０－８７６５－４３２１",
        "０３ー５５５５ー１２３４",
    ],
    "ip": [
        "192.168.10.25",
        "203.0.113.7",
        "2001:db8:85a3::8a2e:370:7334",
        "fe80::1ff:fe23:4567:890a",
    ],
    "card": ["4111 1111 1111 1111", "5500-0000-0000-0004", "３５６６００２０２０３６０５０５"],
}
# Numbers that look alike and must stay: dates, prices, postcodes, times, versions, a card
# number failing Luhn, an ISBN, a population.
LOOKALIKES = [
    "2023-12-01",
    "1,280円",
    "〒100-0001",
    "12:30:45",
    "バージョン1.2.3",
    "4111-1111-1111-1112",
    "人口1234567人",
    "第3-2-1条",
]


def read(path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture
def leads(shared_data) -> list[str]:
    return [r["text"] for r in read(shared_data / "corpus" / "wikipedia_ja_leads.jsonl.gz")]


@pytest.fixture
def web(shared_data) -> list[dict]:
    return read(shared_data / "corpus" / "fineweb2_ja_web.jsonl.gz")


def test_planted_pii_in_real_text_is_masked_and_nothing_else_changes(leads):
    rng = random.Random(3)
    planted = [(kind, value) for kind, values in PLANTED.items() for value in values]
    hosts = rng.sample([lead for lead in leads if len(lead) > 60], len(planted) + len(LOOKALIKES))
    for (kind, value), lead in zip(planted, hosts, strict=False):
        cut = lead.index("。") + 1 if "。" in lead else len(lead) // 2
        text = f"{lead[:cut]}連絡先は {value} です。{lead[cut:]}"
        masked, counts = mask_pii(text)
        assert counts == {kind: 1}, (value, masked)
        assert masked == text.replace(value, PLACEHOLDERS[kind])
    for value, lead in zip(LOOKALIKES, hosts[len(planted) :], strict=True):
        text = f"{lead}({value})"
        assert mask_pii(text) == (text, {}), value
    # Real leads hold none of it: masking leaves every one unchanged.
    assert all(mask_pii(lead)[1] == {} for lead in leads)


def test_masker_step_counts_per_kind_and_honours_each_source(tmp_path, web):
    page = next(r["text"] for r in web if len(r["text"]) > 300)
    text = (
        f"{page}\nお問い合わせ: support@example.jp / 電話 ０３－１２３４－５６７８ / 03-9876-5432"
    )
    documents = [
        Document(text=text, id="w", metadata={"source": "web"}),
        Document(text=text, id="k", metadata={"source": "wiki"}),
    ]
    step = PiiMasker(
        {"web": PiiConfig(mask=["email", "phone"]), "wiki": PiiConfig(mask=[])}, tmp_path / "pii"
    )
    out = list(step.run(iter(documents), rank=0))
    assert out[0].metadata["pii_masked"] == {"email": 1, "phone": 2}
    assert "[EMAIL]" in out[0].text and out[0].text.count("[PHONE]") == 2
    assert out[1].text == text and "pii_masked" not in out[1].metadata
    assert pii_counts(tmp_path / "pii") == {
        "email": 1,
        "phone": 2,
        "ip": 0,
        "card": 0,
        "documents": 1,
    }


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")


def test_blocklist_matches_hosts_and_parent_domains_of_real_urls(tmp_path, web):
    hosts = sorted({url_host(r["url"]) for r in web})
    assert len(hosts) > 50
    blocked_host = hosts[0]
    parent = ".".join(blocked_host.split(".")[-2:])
    (tmp_path / "adult").mkdir()
    (tmp_path / "adult" / "domains").write_text(f"# UT1 style\n{parent}\n\n", encoding="utf-8")
    (tmp_path / "gambling.txt").write_text("casino.example\n", encoding="utf-8")
    domains = load_domains([tmp_path / "adult" / "domains", tmp_path / "gambling.txt"])
    assert domains == {parent: "adult", "casino.example": "gambling"}
    assert listed_domain(f"https://{blocked_host}/page?q=1", domains) == parent
    assert listed_domain("http://www.casino.example:8080/", domains) == "casino.example"
    assert listed_domain("https://notcasino.example/", domains) is None
    assert listed_domain("not a url", domains) is None

    step = UrlBlocklistFilter(
        {"web": [tmp_path / "adult" / "domains"], "wiki": []}, {"web": "url", "wiki": "url"}
    )
    verdicts = [
        step.filter(
            Document(text=r["text"], id=r["id"], metadata={"source": "web", "url": r["url"]})
        )
        for r in web
    ]
    removed = [v for v in verdicts if v is not True]
    expected = sum(1 for r in web if re.search(rf"(^|\.){re.escape(parent)}$", url_host(r["url"])))
    assert len(removed) == expected >= 1
    assert all(reason == f"adult {parent}" for _, reason in removed)
    wiki = Document(
        text="x", id="k", metadata={"source": "wiki", "url": f"https://{blocked_host}/"}
    )
    assert step.filter(wiki) is True  # a source without lists keeps everything
