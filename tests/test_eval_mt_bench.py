"""Japanese MT-Bench: answers with the chat template that resume after a crash, several samples per
question, and the judge client against real HTTP servers on 127.0.0.1 (retried failures, malformed
replies, resumable judgments, redirects, the key kept to the endpoint's origin)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import statistics
import threading
import time
from pathlib import Path

import pytest
from test_eval import build_tokenizer, loaded_from, mistral, save

from common.errors import ConfigError, KinoeError
from common.run import load_stage_config, run_stage
from eval.cli import STEPS, step_dir
from eval.config import EvalConfig
from eval.mt_bench import ANSWERS, JUDGMENTS, _chat_prompt, parse_score, read_jsonl

from conftest import SHARED_DATA, error_lines

MT_BENCH = SHARED_DATA / "eval" / "ja_mt_bench"
KEY = "sk-kinoe-test-0123456789abcdef"
KEY_ENV = "KINOE_JUDGE_API_KEY"


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    """Three real questions: writing (sampled at 0.7), reasoning (greedy, judged with a reference), extraction."""
    if not MT_BENCH.is_dir():
        pytest.skip(f"{MT_BENCH} is absent (see ../shared/data/SOURCES.md)")
    records, _ = read_jsonl(MT_BENCH / "question.jsonl")
    chosen = [
        next(r for r in records if r["category"] == c)
        for c in ("writing", "reasoning", "extraction")
    ]
    path = tmp_path_factory.mktemp("mt_bench") / "question.jsonl"
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="module")
def question_records(questions) -> list[dict]:
    """The questions file's records: writing, reasoning, extraction."""
    return read_jsonl(questions)[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tokenizer_dir, _ = build_tokenizer(tmp_path_factory.mktemp("mt_tokenizer"))
    return save(mistral(), tokenizer_dir, tmp_path_factory.mktemp("mt_model"))


def config_for(root: Path, questions: Path, model: Path | None = None, **values) -> EvalConfig:
    overrides = [
        f"run.root={root}",
        "run.name=mt",
        "device=cpu",
        "dtype=float32",
        f"mt_bench.questions={questions}",
        "mt_bench.max_new_tokens=5",
        f"judge.prompts={MT_BENCH / 'judge_ja_prompts.jsonl'}",
        f"judge.references={MT_BENCH / 'gpt-4.jsonl'}",
        f"judge_endpoint.api_key_env={KEY_ENV}",
        "judge_endpoint.backoff_s=0",
        "judge_endpoint.parallel=2",
        *(f"{key}={value}" for key, value in values.items()),
    ]
    if model is not None:
        overrides.append(f"model={model}")
    return load_stage_config(EvalConfig, None, overrides)


class Judge:
    """An OpenAI-compatible chat-completions server on 127.0.0.1, scripted per request."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.failures_first: list[int] = []  # the first requests fail once each, then succeed
        self.redirects: list[tuple[int, str]] = []  # the first requests get (status, Location)
        self.stalls: list[float] = []  # the first requests wait this long before answering
        self.always_fail: list[str] = []  # user prompts containing these get HTTP 500
        self.malformed: list[str] = []  # ... get a reply without [[score]]
        self.scores: dict[str, str] = {}  # ... containing a key get its score, e.g. {"たぶん": "4"}
        self.lock = threading.Lock()
        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def record(self) -> dict | None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else None
                with judge.lock:
                    judge.requests.append(
                        {
                            "method": self.command,
                            "path": self.path,
                            "auth": self.headers.get("Authorization"),
                            "body": body,
                        }
                    )
                return body

            def do_GET(self):
                self.record()
                self.send_response(405)
                self.end_headers()

            def do_POST(self):
                user = self.record()["messages"][-1]["content"]
                with judge.lock:
                    redirect = judge.redirects.pop(0) if judge.redirects else None
                    stall = judge.stalls.pop(0) if judge.stalls and redirect is None else 0.0
                    failure = None
                    if redirect is None and not stall and judge.failures_first:
                        failure = judge.failures_first.pop(0)
                if redirect is not None:
                    self.send_response(redirect[0])
                    self.send_header("Location", redirect[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                time.sleep(stall)
                if failure is None and any(marker in user for marker in judge.always_fail):
                    failure = 500
                if failure is not None:
                    self.send_response(failure)
                    if failure == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "try again"}}')
                    return
                scored = [score for marker, score in judge.scores.items() if marker in user]
                if scored:
                    content = f"評価：[[{scored[0]}]]"
                elif "[ユーザーの2回目の質問]" in user:
                    content = (
                        "簡潔で正確です。評価：［［７］］"  # full-width, as judges sometimes write
                    )
                elif any(marker in user for marker in judge.malformed):
                    content = "とても丁寧な回答です。"  # no score at all
                else:
                    content = "良い回答です。評価：[[8]]"
                reply = {
                    "model": "judge-test-0613",  # the endpoint's own name for the model
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                }
                data = json.dumps(reply, ensure_ascii=False).encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge():
    server = Judge()
    yield server
    server.close()


def write_answers(path: Path, questions: list[dict], turns: list[str], **fields) -> Path:
    """Answers in FastChat's format, as made elsewhere; ``fields`` such as sample=1 added."""
    with path.open("a", encoding="utf-8") as handle:
        for q in questions:
            record = {
                "question_id": q["question_id"],
                "model_id": "external",
                "choices": [{"index": 0, "turns": turns}],
                **fields,
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def test_scores_are_read_as_fastchat_reads_them():
    assert parse_score("説明。評価：[[7]]") == 7.0
    assert parse_score("評価：［［９］］") == 9.0  # full-width brackets and digits, after NFKC
    assert parse_score("評価は[8.5]です") == 8.5  # FastChat's single-bracket fallback
    assert parse_score("とても良い回答です。") is None


def test_answers_use_the_chat_template_and_resume_after_a_crash(
    model_dir, questions, question_records, tmp_path, monkeypatch
):
    import eval.generate

    config = config_for(tmp_path, questions, model_dir, batch_size=1)
    loaded = loaded_from(mistral(), model_dir)
    ids = _chat_prompt(loaded, [{"role": "user", "content": "こんにちは"}])
    assert (
        loaded.tokenizer.decode(ids)
        == "<s><|im_start|>user\nこんにちは<|im_end|>\n<|im_start|>assistant\n"
    )

    real = eval.generate.generate_batch
    calls = []

    def crash_on_third_call(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise RuntimeError("node lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(eval.generate, "generate_batch", crash_on_third_call)
    with pytest.raises(RuntimeError, match="node lost"):
        run_stage(STEPS["mt-bench"], config)
    answers_path = step_dir(config, "mt-bench") / ANSWERS
    first, _ = read_jsonl(answers_path)
    assert len(first) == 1 and len(first[0]["choices"][0]["turns"]) == 2
    # The second turn's prompt holds the first question, the model's answer and the second question.
    second_turn = loaded.tokenizer.decode(calls[1][0])
    assert (
        second_turn.count("<|im_start|>user") == 2
        and second_turn.count("<|im_start|>assistant") == 2
    )
    with answers_path.open("a", encoding="utf-8") as handle:
        handle.write('{"question_id": 99, "choi')  # a line cut off by the crash
    monkeypatch.setattr(eval.generate, "generate_batch", real)
    result = run_stage(STEPS["mt-bench"], config)
    assert result.status == "complete"
    assert (
        result.manifest.summary["answered_before"],
        result.manifest.summary["answered_now"],
    ) == (1, 2)
    answers, malformed = read_jsonl(answers_path)
    assert malformed == 0 and answers[0] == first[0]
    assert sorted(a["question_id"] for a in answers) == sorted(
        q["question_id"] for q in question_records
    )
    by_category = {a["category"]: a for a in answers}
    assert by_category["writing"]["decoding"]["do_sample"] is True
    assert by_category["writing"]["decoding"]["temperature"] == 0.7
    assert by_category["reasoning"]["decoding"] == {"do_sample": False, "max_new_tokens": 5}
    assert all(
        set(a) >= {"question_id", "answer_id", "model_id", "choices", "tstamp"} for a in answers
    )


def test_mt_bench_command_answers_then_judges_with_retries(
    kinoe, model_dir, questions, question_records, judge, tmp_path
):
    judge.failures_first = [500, 429]  # the two retries the report counts
    judge.malformed = [question_records[2]["turns"][0]]  # extraction, turn 1
    result = kinoe(
        "eval", "mt-bench", f"model={model_dir}", "device=cpu", "dtype=float32",
        f"mt_bench.questions={questions}", "mt_bench.max_new_tokens=4",
        f"judge.prompts={MT_BENCH / 'judge_ja_prompts.jsonl'}", f"judge.references={MT_BENCH / 'gpt-4.jsonl'}",
        f"judge_endpoint.base_url={judge.base_url}", f"judge_endpoint.api_key_env={KEY_ENV}",
        "judge_endpoint.backoff_s=0", "judge_endpoint.parallel=2", "judge.model=judge-test", "run.name=cli",
        env={KEY_ENV: KEY},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "runs" / "eval" / "cli"
    report = json.loads((runs / "judge" / "report.json").read_text())
    judging = report["judging"]
    assert (judging["judgments"], judging["unparsed"], judging["failed"], judging["retries"]) == (
        6,
        1,
        0,
        2,
    )
    results = {r["task"]: r for r in report["results"]}
    assert results["mt_bench"]["metrics"] == {
        "score": pytest.approx(37 / 5),
        "score_std": None,  # one sample: no spread
        "turn_1": 8.0,
        "turn_2": 7.0,
        "samples": 1,
    }
    assert results["mt_bench/extraction"]["metrics"] == {
        "score": 7.0,
        "score_std": None,
        "turn_1": None,
        "turn_2": 7.0,
        "samples": 1,
    }
    # The judge is pinned by the prompt file's content and the model, as asked and as served.
    prompts_sha256 = hashlib.sha256((MT_BENCH / "judge_ja_prompts.jsonl").read_bytes()).hexdigest()
    version = f"judge_ja_prompts@sha256:{prompts_sha256[:12]}+judge-test"
    assert {r["prompt_version"] for r in report["results"]} == {version}
    assert report["judge"]["prompts_sha256"] == prompts_sha256
    assert report["judge"]["served_models"] == ["judge-test-0613"]
    assert (
        "Judge `judge-test` (the endpoint answered as: judge-test-0613)"
        in (runs / "judge" / "report.md").read_text()
    )
    assert results["mt_bench/writing"]["examples"] == 2
    assert (
        "| mt_bench/reasoning | judge | score | 7.5000 |"
        in (runs / "judge" / "report.md").read_text()
    )

    # Every request: the right path and model, the key only in the Authorization header.
    assert {r["path"] for r in judge.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in judge.requests} == {f"Bearer {KEY}"}
    assert {r["body"]["model"] for r in judge.requests} == {"judge-test"}
    assert judge.requests[0]["body"]["messages"][0] == {
        "role": "system",
        "content": "あなたは有益な助手です。",
    }
    judgments, _ = read_jsonl(runs / "judge" / JUDGMENTS)
    assert {(j["sample"], j["served_model"]) for j in judgments} == {(0, "judge-test-0613")}
    prompts = {(j["category"], j["turn"]): j["judge"][1] for j in judgments}
    assert prompts["writing", 1] == "single-v1"
    assert prompts["reasoning", 1] == "single-math-v1"
    assert prompts["reasoning", 2] == "single-math-v1 (turn 2: conversation as the question)"
    references, _ = read_jsonl(MT_BENCH / "gpt-4.jsonl")
    reasoning = next(j for j in judgments if j["category"] == "reasoning" and j["turn"] == 1)
    reference = next(r for r in references if r["question_id"] == reasoning["question_id"])
    assert reference["choices"][0]["turns"][0] in reasoning["user_prompt"]
    # The key is in no file kinoe wrote, nor in its console output.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in result.stderr + result.stdout


def test_samples_are_seeded_apart_and_an_old_answers_file_is_extended(
    model_dir, questions, question_records, tmp_path
):
    greedy = config_for(tmp_path / "greedy", questions, model_dir, **{"mt_bench.samples": 2})
    with pytest.raises(
        KinoeError, match=r"^mt_bench.samples=2, but reasoning, extraction are answered greedily"
    ) as error:
        run_stage(STEPS["mt-bench"], greedy)
    assert "\n" not in str(error.value)

    # Every category at default_temperature (0.7): an empty table replaces FastChat's.
    config = config_for(
        tmp_path, questions, model_dir, batch_size=2,
        **{"mt_bench.samples": 2, "mt_bench.temperatures": "{}"},
    )  # fmt: skip
    answers_path = step_dir(config, "mt-bench") / ANSWERS
    answers_path.parent.mkdir(parents=True)
    # An answer written before samples existed: no "sample", so sample 0.
    write_answers(answers_path, question_records[:1], ["前の回答。", "前の二つ目。"])
    result = run_stage(STEPS["mt-bench"], config)
    summary = result.manifest.summary
    assert (summary["answered_before"], summary["answered_now"], summary["samples"]) == (1, 5, 2)
    answers, _ = read_jsonl(answers_path)
    assert "sample" not in answers[0]  # the old record is kept as it was
    made = {(a["question_id"], a["sample"]): a for a in answers[1:]}
    every = {(q["question_id"], k) for q in question_records for k in (0, 1)}
    assert set(made) == every - {(question_records[0]["question_id"], 0)}
    assert {a["decoding"]["seed"] for a in made.values() if a["sample"] == 0} == {42}
    assert {a["decoding"]["seed"] for a in made.values() if a["sample"] == 1} == {1042}
    texts = {key: a["choices"][0]["turns"] for key, a in made.items()}
    assert any(
        texts[q["question_id"], 0] != texts[q["question_id"], 1] for q in question_records[1:]
    )


def test_judging_resumes_after_the_endpoint_fails(
    questions, question_records, judge, tmp_path, caplog
):
    # Two samples of the first two questions (the third has none): sample 0 written before
    # samples existed (no "sample" key), sample 1 scored 4 where sample 0 is scored 8.
    answers = write_answers(
        tmp_path / "external_answers.jsonl", question_records[:2], ["はい。", "いいえ。"]
    )
    write_answers(answers, question_records[:2], ["たぶん。", "いいえ。"], sample=1)
    judge.scores = {"たぶん。": "4"}
    config = config_for(
        tmp_path, questions, **{"judge.answers": answers, "judge_endpoint.base_url": judge.base_url,
        "judge_endpoint.max_retries": 1, "judge.turns": "[1]", "mt_bench.samples": 2},
    )  # fmt: skip
    judge.always_fail = [question_records[1]["turns"][0]]
    with pytest.raises(
        KinoeError, match=r"^2 judgments failed .*HTTP 500.*run the same command again"
    ) as error:
        run_stage(STEPS["judge"], config)
    assert "\n" not in str(error.value)
    manifest = json.loads((step_dir(config, "judge") / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["summary"]["failed"] == 2
    assert manifest["summary"]["answers_missing"] == 2
    judgments_path = step_dir(config, "judge") / JUDGMENTS
    first, _ = read_jsonl(judgments_path)
    assert sorted((j["question_id"], j["sample"]) for j in first) == [
        (question_records[0]["question_id"], 0),
        (question_records[0]["question_id"], 1),
    ]
    asked = len(judge.requests)
    assert asked == 6  # two successes, two failures retried once each
    # A judgment written before samples existed has no "sample": it counts as sample 0.
    judgments_path.write_text(
        "".join(
            json.dumps({k: v for k, v in j.items() if (k, j["sample"]) != ("sample", 0)}) + "\n"
            for j in first
        )
    )

    judge.always_fail = []
    result = run_stage(STEPS["judge"], config)
    summary = result.manifest.summary
    assert result.status == "complete" and summary["overall"]["judged"] == 4
    assert len(judge.requests) == asked + 2  # only the failed ones are asked again
    assert summary["sample_scores"] == [8.0, 4.0]
    assert summary["overall"]["score"] == 6.0
    assert summary["overall"]["score_std"] == pytest.approx(statistics.stdev([8, 4]), abs=1e-4)
    assert summary["overall"]["samples"] == 2
    judgments, _ = read_jsonl(judgments_path)
    assert sorted((j["question_id"], j.get("sample", 0)) for j in judgments) == sorted(
        (q["question_id"], k) for q in question_records[:2] for k in (0, 1)
    )

    with pytest.raises(KinoeError, match=r"judge_endpoint.base_url is not set"):
        run_stage(
            STEPS["judge"], config_for(tmp_path / "other", questions, **{"judge.answers": answers})
        )


def test_the_key_goes_only_to_the_endpoint_origin(
    questions, question_records, judge, tmp_path, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    answers = write_answers(
        tmp_path / "answers.jsonl", question_records[:1], ["はい。", "いいえ。"]
    )
    values = {"judge.answers": answers, "judge.turns": "[1]", "judge_endpoint.max_retries": 1}

    # The same origin: followed (307 keeps the POST), the key still sent. A stalled reply times out
    # and is retried.
    judge.redirects = [(307, "/v1/moved/chat/completions")]
    judge.stalls = [3.0]
    config = config_for(
        tmp_path / "same", questions,
        **values, **{"judge_endpoint.base_url": judge.base_url, "judge_endpoint.timeout_s": 1.0},
    )  # fmt: skip
    result = run_stage(STEPS["judge"], config)
    assert result.status == "complete" and result.manifest.summary["retries"] == 1
    assert [(r["path"], r["auth"]) for r in judge.requests] == [
        ("/v1/chat/completions", f"Bearer {KEY}"),
        ("/v1/moved/chat/completions", f"Bearer {KEY}"),
        ("/v1/chat/completions", f"Bearer {KEY}"),
    ]

    # Another origin (the same address, another port): refused before anything is sent there.
    other = Judge()
    judge.requests = []
    judge.redirects = [(302, f"{other.base_url}/chat/completions")]
    config = config_for(
        tmp_path / "cross", questions, **values, **{"judge_endpoint.base_url": judge.base_url}
    )
    with pytest.raises(
        KinoeError,
        match=rf"^judge endpoint {judge.base_url}/chat/completions redirected to another origin "
        rf"\(http://127.0.0.1:{other.server.server_port}\); .*judge_endpoint.base_url",
    ) as error:
        run_stage(STEPS["judge"], config)
    assert "\n" not in str(error.value) and KEY not in str(error.value)
    assert len(judge.requests) == 1 and other.requests == []

    # Nothing listening: connection errors are retried, then the request fails.
    other.close()
    config = config_for(
        tmp_path / "down", questions, **values, **{"judge_endpoint.base_url": other.base_url}
    )
    with pytest.raises(KinoeError, match=r"^1 judgments failed .*failed 2 times .*ConnectError"):
        run_stage(STEPS["judge"], config)

    # http:// to anything but loopback is refused when the config is read, from the environment too.
    with pytest.raises(ConfigError, match=r"is http:// to example.com.*use https://example.com"):
        config_for(tmp_path, questions, **{"judge_endpoint.base_url": "http://example.com/v1"})
    monkeypatch.setenv("OPENAI_BASE_URL", "http://example.com/v1")
    config = config_for(tmp_path / "environment", questions, **{"judge.answers": answers})
    with pytest.raises(KinoeError, match=r"^\$OPENAI_BASE_URL is http:// to example.com"):
        run_stage(STEPS["judge"], config)


# ---------------------------------------------------------------- bad input: what the user sees
#
# The matrix of tests/test_eval.py for `kinoe eval judge`'s input files (docs/reliability.md,
# "Bad input"). A bad question or reference answer stops the run in one `error:` line naming the
# first (a changed benchmark scores nothing comparable), before any request; a bad line of the
# answers file is left out, counted and named in a warning, and every other answer is judged.


def good_answers(records: list[dict]) -> bytes:
    return "".join(
        json.dumps(
            {
                "question_id": q["question_id"],
                "model_id": "m",
                "choices": [{"turns": ["はい。", "いいえ。"]}],
            },
            ensure_ascii=False,
        )
        + "\n"
        for q in records
    ).encode()


def with_line(good: bytes, bad: bytes) -> bytes:
    """``good``'s lines with ``bad`` after the first."""
    lines = good.splitlines(keepends=True)
    return b"".join([*lines[:1], bad, *lines[1:]])


def fifty_mb_answer(good: bytes) -> bytes:
    turns = ["答" * (50 * 2**20 // 3), "x"]
    record = {"question_id": 1, "model_id": "m", "choices": [{"turns": turns}]}
    return with_line(good, json.dumps(record, ensure_ascii=False).encode() + b"\n")


def truncated_answers_gz(good: bytes) -> bytes:
    packed = gzip.compress(good)
    return packed[: len(packed) // 2]


NOT_UTF8 = b'{"question_id": 1, "model_id": "caf\xe9", "choices": [{"turns": ["a"]}]}\n'
CUT = '{"question_id": 1, "choices": [{"turns": ["途中で\n'.encode()

# name -> (which file: questions, references or answers; its bytes from the good ones (None:
# absent); expected: the error's words, or (lines left out, words of the first))
MT_BENCH_MATRIX = {
    "answers: empty file": ("answers", lambda good: b"", "holds no answer to judge (0 lines"),
    "answers: invalid UTF-8": (
        "answers",
        lambda good: with_line(good, NOT_UTF8),
        (1, ":2: not UTF-8 (byte 35)"),
    ),
    "answers: Shift_JIS file": (
        "answers",
        lambda good: good.decode().encode("cp932"),
        "holds no answer to judge (3 lines left out, the first",
    ),
    "answers: .gz (not accepted)": ("answers", truncated_answers_gz, "holds no answer to judge"),
    "answers: malformed record": (
        "answers",
        lambda good: with_line(good, CUT),
        (1, ":2: not JSON ("),
    ),
    "answers: wrong field type": (
        "answers",
        lambda good: with_line(
            good,
            b'{"question_id": [1], "choices": []}\n{"question_id": 2, "choices": [{"turns": "a"}]}\n',
        ),
        (2, ":2: question_id must be a number or a string"),
    ),
    "answers: 50 MB record": (
        "answers",
        fifty_mb_answer,
        (1, ":2: 17,476,267 characters, more than an answer may have"),
    ),
    "answers: missing file": ("answers", lambda good: None, "input judge.answers = "),
    "questions: empty file": ("questions", lambda good: b"", "holds no question"),
    "questions: invalid UTF-8": (
        "questions",
        lambda good: with_line(good, NOT_UTF8),
        ":2: not UTF-8 (byte 35)",
    ),
    "questions: Shift_JIS file": (
        "questions",
        lambda good: good.decode().encode("cp932"),
        "reads as Shift_JIS: convert the file",
    ),
    "questions: malformed record": (
        "questions",
        lambda good: with_line(good, CUT),
        ":2: not JSON (",
    ),
    "questions: wrong field type": (
        "questions",
        lambda good: with_line(
            good, b'{"question_id": 7, "category": "writing", "turns": "one"}\n'
        ),
        ":2: turns must be a list of the user's turns",
    ),
    "questions: 50 MB record": (
        "questions",
        lambda good: with_line(
            good,
            json.dumps(
                {"question_id": 7, "category": "writing", "turns": ["問" * (50 * 2**20 // 3)]}
            ).encode()
            + b"\n",
        ),
        "characters, more than a question may have",
    ),
    "questions: missing file": ("questions", lambda good: None, "input mt_bench.questions = "),
    "references: empty file": ("references", lambda good: b"", "holds no reference answer"),
    "references: invalid UTF-8": (
        "references",
        lambda good: with_line(good, NOT_UTF8),
        ":2: not UTF-8 (byte 35)",
    ),
    "references: malformed record": (
        "references",
        lambda good: with_line(good, CUT),
        "are not reference answers, the first",
    ),
    "references: wrong field type": (
        "references",
        lambda good: with_line(good, b'{"question_id": 7, "choices": "a"}\n'),
        ":2: choices must be a list of objects",
    ),
    "references: missing file": ("references", lambda good: None, "input judge.references = "),
}


@pytest.mark.parametrize("case", list(MT_BENCH_MATRIX))
def test_bad_input_to_eval_judge(case, questions, question_records, judge, tmp_path, kinoe):
    which, contents, expected = MT_BENCH_MATRIX[case]
    good = {
        "questions": questions.read_bytes(),
        "references": (MT_BENCH / "gpt-4.jsonl").read_bytes(),
        "answers": good_answers(question_records),
    }
    paths = {name: tmp_path / f"{name}.jsonl" for name in good}
    for name, path in paths.items():
        data = contents(good[name]) if name == which else good[name]
        if data is not None:
            path.write_bytes(data)
    outcome = kinoe(
        "eval", "judge", "run.name=mt", f"mt_bench.questions={paths['questions']}",
        f"judge.prompts={MT_BENCH / 'judge_ja_prompts.jsonl'}",
        f"judge.references={paths['references']}", f"judge.answers={paths['answers']}",
        f"judge_endpoint.api_key_env={KEY_ENV}", f"judge_endpoint.base_url={judge.base_url}",
        env={KEY_ENV: KEY},
    )  # fmt: skip
    if isinstance(expected, str):
        assert outcome.returncode == 1 and len(error_lines(outcome)) == 1, outcome.stderr
        assert expected in error_lines(outcome)[0], error_lines(outcome)[0]
        assert not judge.requests  # refused before anything was sent
        return
    left_out, first = expected
    assert outcome.returncode == 0 and not error_lines(outcome), outcome.stderr
    summary = json.loads((tmp_path / "runs/eval/mt/judge/manifest.json").read_text())["summary"]
    assert summary["answers_left_out"] == left_out
    assert first in summary["answers_left_out_first"][0]
    warning = f"{left_out} lines of {paths['answers']} are not answers and are left out, the first"
    assert warning in outcome.stderr and first in outcome.stderr
    # Every good answer was judged: both turns of each question.
    assert summary["answers_missing"] == 0 and summary["judgments"] == 2 * len(question_records)
