"""The ``kinoe data`` config: sources, per-source normalisation and filter presets, dedup, executor."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from common.config import Config
from common.executor import ExecutorConfig
from common.run import StageConfig
from data_prep.filter_rules import QualityConfig
from data_prep.normalise import NormaliseConfig
from data_prep.pii import PiiConfig
from data_prep.source_presets import source_preset

SourceKind = Literal["c4_ja", "wikipedia_ja", "jsonl", "parquet", "aozora"]

# Which filter and normalisation preset a source kind gets unless the source names one.
DEFAULT_PRESET: dict[str, str] = {
    "c4_ja": "web",
    "wikipedia_ja": "wikipedia",
    "jsonl": "web",
    "parquet": "web",
    "aozora": "literature",
}

C4_HUB_FOLDER = "hf://datasets/allenai/c4/multilingual"
C4_JA_GLOB = "c4-ja.tfrecord-*.json.gz"
WIKIPEDIA_HUB_FOLDER = "hf://datasets/wikimedia/wikipedia"


class SourceConfig(Config):
    """One input source; every document it yields is tagged ``source: <name>``."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Tag written to each document")
    kind: SourceKind
    path: str | None = Field(
        None,
        description="Local folder (or fsspec URL) to read; for c4_ja and wikipedia_ja, "
        "omit it to stream from the Hugging Face Hub",
    )
    glob: str | None = Field(None, description="Files to read under path, e.g. '*.jsonl.gz'")
    text_field: str = "text"
    id_field: str = "id"
    wikipedia_dump: str = Field("20231101.ja", description="wikimedia/wikipedia config to stream")
    limit: int = Field(-1, description="At most this many documents per task (-1: all); for trials")
    preset: str | None = Field(
        None,
        description="Normalisation and filter preset, a file in data_prep/presets/ (web, "
        "wikipedia, literature); defaults by kind",
    )
    normalise: NormaliseConfig = Field(
        default=None, description="Normalisation settings; the preset's, with any keys given here"
    )
    pii: PiiConfig = Field(
        default=None, description="Personal data masked; the preset's (web: all kinds), or as given"
    )
    filters: QualityConfig = Field(
        default=None,
        description="Quality-filter thresholds; the preset's, with any keys given here",
    )
    url_field: str = Field("url", description="Metadata field holding a document's URL")
    min_quality_score: float | None = Field(
        None,
        ge=0,
        le=1,
        description="With quality.model set: score this source's documents and remove those "
        "under this quality score (0 scores without removing); None: not scored",
    )
    url_blocklist: list[Path] = Field(
        default_factory=list,
        description="Domain lists (UT1 style: one domain per line, '#' comments); a document "
        "whose URL's host or any parent domain is listed is removed (url_blocklist)",
    )

    @model_validator(mode="before")
    @classmethod
    def _start_from_preset(cls, data: Any) -> Any:
        """Fill ``normalise`` and ``filters`` from the preset, then apply the keys the user gave."""
        if not isinstance(data, dict):
            return data
        preset = source_preset(
            data.get("preset") or DEFAULT_PRESET.get(str(data.get("kind")), "web")
        )
        data = dict(data)
        data["normalise"] = _merge(preset.normalise.model_dump(), data.get("normalise"))
        data["pii"] = _merge(preset.pii.model_dump(), data.get("pii"))
        data["filters"] = _merge(preset.filters.model_dump(), data.get("filters"))
        return data

    @field_validator("url_blocklist")
    @classmethod
    def _lists_exist(cls, paths: list[Path]) -> list[Path]:
        for path in paths:
            if not path.is_file():
                raise ValueError(f"domain list {path} not found; give existing files")
        return paths

    @model_validator(mode="after")
    def _readable(self) -> SourceConfig:
        if self.kind in ("jsonl", "parquet", "aozora") and not self.path:
            raise ValueError(f"source {self.name!r} of kind {self.kind} needs a path to read")
        return self

    def folder(self) -> str:
        """Where this source's files are: the local path or the Hub folder."""
        if self.path:
            return self.path
        if self.kind == "c4_ja":
            return C4_HUB_FOLDER
        return f"{WIKIPEDIA_HUB_FOLDER}/{self.wikipedia_dump}"

    def file_glob(self) -> str | None:
        """Which files under ``folder()`` to read."""
        if self.glob:
            return self.glob
        return {
            "c4_ja": C4_JA_GLOB,
            "wikipedia_ja": "*.parquet",
            "jsonl": "**/*.jsonl*",
            "parquet": "**/*.parquet",
            "aozora": None,
        }[self.kind]

    def is_local(self) -> bool:
        """True when the source reads files on this machine (an input kinoe can hash)."""
        return bool(self.path) and "://" not in str(self.path)


def _merge(base: dict[str, Any], given: Any) -> Any:
    """``given`` laid over ``base`` key by key (nested dicts merged); non-dicts replace."""
    if given is None:
        return base
    if not isinstance(given, dict):
        return given
    merged = dict(base)
    for key, value in given.items():
        merged[key] = _merge(base[key], value) if isinstance(base.get(key), dict) else value
    return merged


class MinhashSettings(Config):
    """MinHash near-duplicate detection on character n-grams (LSH with bands of rows)."""

    enabled: bool = True
    ngram: int = Field(5, ge=1, description="Characters per shingle")
    bands: int = Field(
        20,
        ge=1,
        description="LSH bands (buckets); a pair matching in any band is a candidate, then verified",
    )
    rows: int = Field(6, ge=1, description="Hashes per band")
    seed: int = 1
    min_chars: int = Field(
        100,
        ge=0,
        description="Documents with fewer characters are deduplicated exactly only: distinct "
        "short leads share most of their few n-grams",
    )
    min_jaccard: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Candidate pairs are duplicates only when the Jaccard similarity of their "
        "character n-gram sets reaches this",
    )

    @property
    def threshold(self) -> float:
        """Jaccard similarity at which a pair is found with probability about 1/2: (1/bands)^(1/rows)."""
        return (1.0 / self.bands) ** (1.0 / self.rows)

    def detection_probability(self, similarity: float) -> float:
        """Probability that a pair with this Jaccard similarity shares at least one band."""
        return 1.0 - (1.0 - similarity**self.rows) ** self.bands


class DedupConfig(Config):
    """Exact (whole normalised text) and near (MinHash) deduplication, across all sources and shards."""

    exact: bool = True
    minhash: MinhashSettings = Field(default_factory=MinhashSettings)


class OutputConfig(Config):
    """How kept and removed documents are written."""

    format: Literal["jsonl.gz", "parquet"] = "jsonl.gz"
    max_file_mb: int = Field(
        -1, description="Start a new shard after this many MB per task (-1: one file per task)"
    )


class ReportConfig(Config):
    """What the funnel report includes."""

    samples_per_step: int = Field(
        5, ge=0, description="Removed documents shown per filter for review"
    )
    sample_chars: int = Field(400, ge=20, description="Characters shown of each sample")


class ClassifierConfig(Config):
    """The quality classifier in a ``kinoe data`` run: which trained model scores the documents."""

    model: Path | None = Field(
        None,
        description="Run directory of python -m data_prep.quality_train (model.bin, "
        "classifier.json); None: no scoring. Sources score when their min_quality_score is set",
    )
    samples_per_band: int = Field(3, ge=0, description="Documents shown per 0.1 score band")

    @field_validator("model")
    @classmethod
    def _trained(cls, folder: Path | None) -> Path | None:
        if folder is not None and not (Path(folder) / "model.bin").is_file():
            raise ValueError(
                f"{folder} holds no model.bin; give the run directory of "
                "python -m data_prep.quality_train"
            )
        return folder


class DataConfig(StageConfig):
    """``kinoe data``: readers -> normalisation -> quality filters -> exact and MinHash dedup -> writers."""

    fingerprint_exclude: ClassVar[frozenset[str]] = frozenset({"run", "executor"})

    sources: list[SourceConfig] = Field(min_length=1)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    quality: ClassifierConfig = Field(default_factory=ClassifierConfig)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [source.name for source in sources]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"source names must be unique; repeated: {', '.join(repeated)}")
        return sources

    @model_validator(mode="after")
    def _scored_with_a_model(self) -> DataConfig:
        for index, source in enumerate(self.sources):
            if source.min_quality_score is not None and self.quality.model is None:
                raise ValueError(
                    f"sources.{index}.min_quality_score needs a classifier: set quality.model to "
                    "a run directory of python -m data_prep.quality_train, or remove the threshold"
                )
        return self

    def local_inputs(self) -> dict[str, Path]:
        """Each local source's files by config key, for hashing into the manifest (see
        ``source_inputs``), the domain lists, and the quality model."""
        inputs = source_inputs(self.sources, "sources")
        for index, source in enumerate(self.sources):
            # A domain list edited between runs changes what is kept.
            for number, path in enumerate(source.url_blocklist):
                inputs[f"sources.{index}.url_blocklist.{number}"] = path
        if self.quality.model is not None:
            inputs["quality.model"] = self.quality.model
        return inputs


def source_inputs(sources: list[SourceConfig], prefix: str) -> dict[str, Path]:
    """Each local source's files by config key (``<prefix>.<index>.path/<file>``).

    Only the files the source reads (its glob under its folder), so a README or another
    source's files beside them do not change a run's fingerprint; a folder the glob
    matches nothing in is listed whole, and reported by the reader.
    """
    inputs: dict[str, Path] = {}
    for index, source in enumerate(sources):
        if not source.is_local():
            continue
        key, folder, pattern = f"{prefix}.{index}.path", Path(source.path), source.file_glob()
        matched = folder.glob(pattern) if pattern and folder.is_dir() else []
        files = sorted(p for p in matched if p.is_file())
        for file in files:
            inputs[f"{key}/{file.relative_to(folder).as_posix()}"] = file
        if not files:
            inputs[key] = folder
    return inputs
