"""The ``kinoe eval`` config: which model, where it runs, which tasks on how much data, MT-Bench and its judge.

One config serves every step (``run``, ``mt-bench``, ``judge``). Sections that say where or how
the work runs, not what it computes (batch sizes, the offload escape hatch, the judge's endpoint,
W&B), stay out of the fingerprint, so changing them never refuses a rerun or redoes finished work.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from common.config import Config
from common.run import StageConfig

Scoring = Literal["loglik", "generation"]
BPC_TASK = "bpc"
JGLUE_TASKS = ("jcommonsenseqa", "jnli", "jsquad", "jsts")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")

# FastChat's llm_judge temperatures per MT-Bench category (gen_model_answer.py); 0 means greedy.
FASTCHAT_TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}


class BpcConfig(Config):
    """Bits per character on held-out Japanese text (tokenizer-independent language modelling)."""

    texts: list[Path] = Field(
        default_factory=list,
        description=".jsonl/.jsonl.gz documents (a 'text' field each, e.g. `kinoe tokenizer train`'s "
        "held_out.jsonl) or .txt files (one document each)",
    )
    max_documents: int | None = Field(None, ge=1, description="The first N documents; None: all")
    stride: int | None = Field(
        None, ge=1, description="Tokens a window advances in long documents; None: max_length / 2"
    )


class MtBenchConfig(Config):
    """Japanese MT-Bench answers: the questions and how the model answers them."""

    questions: Path | None = Field(None, description="question.jsonl (two turns per question)")
    temperatures: dict[str, float] = Field(
        default_factory=lambda: dict(FASTCHAT_TEMPERATURES),
        description="Sampling temperature per category; 0: greedy",
    )
    default_temperature: float = Field(0.7, ge=0, description="For categories not listed")
    max_new_tokens: int = Field(1024, ge=1, description="Per turn")
    samples: int = Field(
        1,
        ge=1,
        description="Answers per question, each with its own seed; the judge averages over them "
        "(Swallow: 5). Above 1 every category must sample (temperature above 0)",
    )


class JudgeConfig(Config):
    """How answers are judged: it decides the scores, so all of it is part of the fingerprint."""

    model: str = Field("gpt-4", description="The judge model's name at the endpoint")
    prompts: Path | None = Field(None, description="judge_ja_prompts.jsonl")
    references: Path | None = Field(None, description="gpt-4.jsonl: reference answers")
    reference_categories: list[str] = Field(
        default_factory=lambda: ["math", "reasoning", "coding"],
        description="Categories judged against the reference answer (FastChat's NEED_REF_CATS)",
    )
    answers: Path | None = Field(
        None, description="Answers to judge (FastChat JSONL); None: this run's `mt-bench` answers"
    )
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(2048, ge=1)
    turns: list[int] = Field(default_factory=lambda: [1, 2], description="Turns to judge")

    @field_validator("turns")
    @classmethod
    def _one_or_two(cls, turns: list[int]) -> list[int]:
        if not turns or any(turn not in (1, 2) for turn in turns):
            raise ValueError("judge.turns lists 1, 2 or both")
        return sorted(set(turns))


def check_endpoint_url(url: str, key: str) -> str:
    """``url`` when the judge key may be sent to it: https, or http to this machine's loopback."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key} must be an https:// API root, e.g. https://api.openai.com/v1")
    if parts.username is not None or parts.password is not None:
        # A URL is written into config.yaml and the manifest; a key belongs in the environment.
        raise ValueError(
            f"{key} holds credentials (user:password@); put the key in the environment "
            "variable judge_endpoint.api_key_env names"
        )
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise ValueError(
            f"{key} is http:// to {parts.hostname}, which would send the judge key unencrypted "
            f"over the network; use https://{parts.netloc} (http is accepted only for 127.0.0.1, "
            "::1 and localhost)"
        )
    return url


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JudgeEndpointConfig(Config):
    """Where and how the judge is reached; the key comes only from the environment variable named here."""

    base_url: str | None = Field(
        None,
        description="An OpenAI-compatible API root, e.g. https://api.openai.com/v1; https, or "
        "http only to 127.0.0.1, ::1 or localhost",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable with the key")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(8, ge=0, description="Retries of a failed request (429, 5xx, network)")
    backoff_s: float = Field(2.0, ge=0, description="First retry delay; doubles each retry")
    max_backoff_s: float = Field(60.0, ge=0)
    parallel: int = Field(4, ge=1, description="Requests in flight at once")

    @field_validator("base_url")
    @classmethod
    def _safe_for_the_key(cls, url: str | None) -> str | None:
        return None if url is None else check_endpoint_url(url, "judge_endpoint.base_url")


class WandbConfig(Config):
    """W&B logging of the report table; the API key comes only from WANDB_API_KEY or `wandb login`.

    The same fields as ``kinoe pretrain``'s ``monitor.wandb``; declared here because a stage
    reads earlier stages' artifacts, never their code.
    """

    enabled: bool = False
    mode: Literal["online", "offline"] = "online"
    entity: str | None = None
    project: str = "kinoe"
    group: str | None = None
    name: str | None = None  # None: the kinoe run name
    tags: list[str] = Field(default_factory=list)


class EvalConfig(StageConfig):
    """``kinoe eval run|mt-bench|judge``: one config, a run directory per step."""

    fingerprint_exclude: ClassVar[frozenset[str]] = frozenset(
        {"run", "wandb", "batch_size", "max_batch_size", "allow_offload", "judge_endpoint"}
    )

    model: Path | None = Field(None, description="A Hugging Face causal LM directory")
    tokenizer: Path | None = Field(None, description="Its tokenizer directory; None: the model's")
    device: str = Field("cuda", description="cpu, cuda or cuda:N: where every parameter must be")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device_map: Literal["single", "auto"] = Field(
        "single", description="single: the whole model on `device`; auto: spread over the GPUs"
    )
    allow_offload: bool = Field(
        False, description="Run (with a loud warning) when parts of the model sit on CPU or disk"
    )
    tasks: list[str] = Field(
        default_factory=lambda: list(JGLUE_TASKS),
        description="Tasks from the registry (eval/tasks/), and 'bpc' for bits per character",
    )
    scoring: list[Scoring] = Field(
        default_factory=lambda: ["loglik", "generation"],
        description="Scoring modes; each task runs those it supports",
    )
    split: Literal["test", "dev"] = Field(
        "test", description="test: JGLUE valid; dev: the last 10% of shuffled train (llm-jp-eval)"
    )
    limit: int | None = Field(None, ge=1, description="The first N examples of each task")
    fraction: float | None = Field(
        None, gt=0, le=1, description="A seeded random share of each task, in file order"
    )
    shots: int = Field(4, ge=0, description="Few-shot examples (llm-jp-eval's default: 4)")
    task_shots: dict[str, int] = Field(
        default_factory=dict, description="Few-shot count per task, overriding `shots`"
    )
    seed: int = Field(
        42, description="Train/dev split, few-shot order and subsets (llm-jp-eval: 42)"
    )
    jglue_dir: Path | None = Field(
        None, description="Folder of <task>-<split>.json files (`kinoe eval download` writes one)"
    )
    data_dir: Path | None = Field(
        None,
        description="Folder of one folder per dataset (jmmlu/, niilc/, ...), e.g. ../shared/data/eval; "
        "JGLUE reads jglue_dir when set, else <data_dir>/jglue",
    )
    task_files: dict[str, dict[Literal["train", "test"], str]] = Field(
        default_factory=dict,
        description="Per task, the file name or glob pattern a split reads in its folder "
        "(default: upstream's names), e.g. task_files.jsick.test=train.tsv",
    )
    task_max_new_tokens: dict[str, int] = Field(
        default_factory=dict,
        description="A fixed generation limit per task; default: the longest gold answer in the "
        "model's tokens plus a margin, never below llm-jp-eval's output length",
    )
    max_length: int | None = Field(
        None,
        ge=16,
        description="Tokens per sequence; longer prompts lose their start. None: the model's",
    )
    batch_size: int | Literal["auto"] = Field(
        "auto", description="Prompts per forward pass; auto: largest that fits, halving on OOM"
    )
    max_batch_size: int = Field(64, ge=1, description="Where `auto` starts")
    bpc: BpcConfig = Field(default_factory=BpcConfig)
    mt_bench: MtBenchConfig = Field(default_factory=MtBenchConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    judge_endpoint: JudgeEndpointConfig = Field(default_factory=JudgeEndpointConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not _DEVICE.match(device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, not {device!r}")
        return device

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, size: int | str) -> int | str:
        if isinstance(size, int) and size < 1:
            raise ValueError("batch_size must be a positive integer or 'auto'")
        return size

    @field_validator("tasks")
    @classmethod
    def _registered(cls, tasks: list[str]) -> list[str]:
        from eval.tasks import REGISTRY

        known = [*REGISTRY, BPC_TASK]
        unknown = [task for task in tasks if task not in known]
        if unknown:
            raise ValueError(f"unknown tasks {', '.join(unknown)}; known: {', '.join(known)}")
        if not tasks:
            raise ValueError("tasks is empty; name at least one of " + ", ".join(known))
        return list(dict.fromkeys(tasks))

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        if self.limit is not None and self.fraction is not None:
            raise ValueError("set limit or fraction, not both (both pick a subset of each task)")
        if BPC_TASK in self.tasks and not self.bpc.texts:
            raise ValueError("tasks has 'bpc' but bpc.texts is empty; list held-out text files")
        from eval.tasks import REGISTRY

        for key in ("task_shots", "task_files", "task_max_new_tokens"):
            unknown = sorted(set(getattr(self, key)) - set(REGISTRY))
            if unknown:
                raise ValueError(
                    f"{key} names unknown tasks: {', '.join(unknown)}; known: {', '.join(REGISTRY)}"
                )
        small = {k: v for k, v in self.task_max_new_tokens.items() if v < 1}
        if small:
            raise ValueError(f"task_max_new_tokens must be at least 1: {small}")
        return self

    @property
    def dataset_tasks(self) -> list[str]:
        """The selected tasks that read a dataset (all but bpc), in order."""
        return [task for task in self.tasks if task != BPC_TASK]

    def source_for(self, name: str):
        """Where task ``name`` reads its files (``eval.data.TaskSource``)."""
        from eval.data import task_source
        from eval.tasks import REGISTRY

        return task_source(REGISTRY[name], self.data_dir, self.jglue_dir, self.task_files.get(name))

    def shots_for(self, task: str) -> int:
        """Few-shot examples for ``task``."""
        return self.task_shots.get(task, self.shots)
