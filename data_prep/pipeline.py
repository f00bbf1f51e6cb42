"""The data_prep pipeline as datatrove steps, and the executors that run them locally or on SLURM.

Steps, each a datatrove executor depending on the one before (tasks in brackets)::

    filter            [N]  readers -> count -> read_errors -> url_blocklist -> normalise -> pii
                           -> quality filters -> quality_score -> quality_classifier -> work/filtered
    exact_signature   [N]  work/filtered -> 64-bit hash of each text
    exact_find        [1]  all hashes -> which documents repeat an earlier one
    exact_filter      [N]  work/filtered -> drop repeats (removed/exact_dedup) -> work/exact_deduped
    minhash_signature [N]  -> character n-gram MinHash signatures (none under min_chars), shingle sets
    minhash_buckets   [B]  one task per LSH band: candidate pairs
    minhash_verify    [B]  candidates kept only at true shingle Jaccard >= min_jaccard
    minhash_cluster   [1]  union-find over verified pairs: clusters, their sizes (exact copies
                           counted), who to drop
    minhash_filter    [N]  -> drop all but one per cluster (removed/near_dedup) -> documents/

Dedup steps find documents by their position in a task's input, so every step of a chain
reads the same files with the same number of tasks. A disabled dedup drops its steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupFilter

from common.executor import PipelineStage
from data_prep.config import DataConfig
from data_prep.dedup import (
    CharacterMinhashSignature,
    MinhashCluster,
    MinhashVerify,
    exact_config,
    minhash_config,
)
from data_prep.filter_steps import STEP_ORDER, quality_steps
from data_prep.normalise import Normaliser
from data_prep.outputs import CountDocuments, TallyingJsonlWriter, TallyingParquetWriter
from data_prep.pii import PiiMasker
from data_prep.quality_model import QualityScoreFilter, QualityScorer
from data_prep.sources import JsonlDocuments, ReadErrors, reader_for
from data_prep.url_blocklist import UrlBlocklistFilter

EXACT_DEDUP = "exact_dedup"
NEAR_DEDUP = "near_dedup"
INPUT_TALLY = "input"
KEPT_TALLY = "kept"
PII_TALLY = "pii"
NORMALISED_TALLY = "normalised"
QUALITY_TALLY = "quality_scores"


@dataclass(frozen=True)
class Layout:
    """Where everything goes inside the run directory."""

    root: Path

    @property
    def documents(self) -> Path:
        return self.root / "documents"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def minhash_verified(self) -> Path:
        return self.work / "minhash" / "verified"

    def removed(self, step: str) -> Path:
        return self.root / "removed" / step

    def tally(self, label: str) -> Path:
        return self.work / "tally" / label

    def logs(self, step: str) -> Path:
        return self.work / "logs" / step


def removed_before_normalising(config: DataConfig) -> list[str]:
    """Removal steps before the text is normalised (their documents keep their read lengths)."""
    return [ReadErrors.name, *([UrlBlocklistFilter.name] if uses_blocklist(config) else [])]


def removal_order(config: DataConfig) -> list[str]:
    """Names of the steps that remove documents, in pipeline order (the funnel's rows)."""
    names = removed_before_normalising(config)
    names += [step.name for step in STEP_ORDER]
    if scored_sources(config):
        names.append(QualityScoreFilter.name)
    if config.dedup.exact:
        names.append(EXACT_DEDUP)
    if config.dedup.minhash.enabled:
        names.append(NEAR_DEDUP)
    return names


class IntermediateDocuments(JsonlDocuments):
    """kinoe's own files between steps; a folder with none (every document was removed before)
    is an empty input, not an error."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if not self.data_folder.list_files(glob_pattern=self.glob_pattern, recursive=True):
            return
        yield from super().run(data, rank, world_size)


def scored_sources(config: DataConfig) -> set[str]:
    """Sources the quality classifier scores: those with a min_quality_score, when a model is set."""
    if config.quality.model is None:
        return set()
    return {s.name for s in config.sources if s.min_quality_score is not None}


def uses_blocklist(config: DataConfig) -> bool:
    """True when some source has URL domain lists (the step and its funnel row exist only then)."""
    return any(source.url_blocklist for source in config.sources)


def build_stages(config: DataConfig, layout: Layout) -> list[PipelineStage]:
    """The pipeline for this config, as executor-sized stages."""
    tasks = config.executor.tasks
    max_file_mb = config.output.max_file_mb

    def removed_writer(step: str) -> TallyingJsonlWriter:
        return TallyingJsonlWriter(
            layout.removed(step), layout.tally(f"removed/{step}"), removed_by=step
        )

    def kept_writer() -> PipelineStep:
        writer = TallyingParquetWriter if config.output.format == "parquet" else TallyingJsonlWriter
        return writer(layout.documents, layout.tally(KEPT_TALLY), max_file_mb=max_file_mb)

    def intermediate(folder: Path) -> IntermediateDocuments:
        return IntermediateDocuments(str(folder), "*.jsonl.gz", source=None)

    dedup_steps = config.dedup.exact or config.dedup.minhash.enabled
    filtered = layout.work / "filtered"
    first: list[PipelineStep] = [reader_for(source) for source in config.sources]
    first += [
        CountDocuments(layout.tally(INPUT_TALLY)),
        ReadErrors(exclusion_writer=removed_writer(ReadErrors.name)),
    ]
    if uses_blocklist(config):
        first.append(
            UrlBlocklistFilter(
                {source.name: source.url_blocklist for source in config.sources},
                {source.name: source.url_field for source in config.sources},
                exclusion_writer=removed_writer(UrlBlocklistFilter.name),
            )
        )
    first += [
        Normaliser({source.name: source.normalise for source in config.sources}),
        PiiMasker({source.name: source.pii for source in config.sources}, layout.tally(PII_TALLY)),
        # Lengths as every later step sees them, for the report's length table.
        CountDocuments(layout.tally(NORMALISED_TALLY)),
        *quality_steps({source.name: source.filters for source in config.sources}, removed_writer),
    ]
    if scored_sources(config):
        first += [
            QualityScorer(
                config.quality.model,
                scored_sources(config),
                layout.tally(QUALITY_TALLY),
                config.quality.samples_per_band,
            ),
            QualityScoreFilter(
                {s.name: s.min_quality_score or 0.0 for s in config.sources},
                exclusion_writer=removed_writer(QualityScoreFilter.name),
            ),
        ]
    first += [
        TallyingJsonlWriter(filtered, layout.tally("filtered")) if dedup_steps else kept_writer(),
    ]
    stages = [PipelineStage("filter", first, tasks)]
    current = filtered

    if config.dedup.exact:
        exact = exact_config()
        signatures, duplicates = (
            layout.work / "exact" / "signatures",
            layout.work / "exact" / "duplicates",
        )
        deduped = layout.work / "exact_deduped"
        last = not config.dedup.minhash.enabled
        stages += [
            PipelineStage(
                "exact_signature",
                [intermediate(current), ExactDedupSignature(str(signatures), exact)],
                tasks,
            ),
            PipelineStage(
                "exact_find", [ExactFindDedups(str(signatures), str(duplicates), exact)], 1
            ),
            PipelineStage(
                "exact_filter",
                [
                    intermediate(current),
                    ExactDedupFilter(
                        str(duplicates), exact, exclusion_writer=removed_writer(EXACT_DEDUP)
                    ),
                    kept_writer()
                    if last
                    else TallyingJsonlWriter(deduped, layout.tally("exact_deduped")),
                ],
                tasks,
            ),
        ]
        current = deduped

    if config.dedup.minhash.enabled:
        settings = config.dedup.minhash
        minhash = minhash_config(settings)
        signatures = layout.work / "minhash" / "signatures"
        buckets, clusters = (
            layout.work / "minhash" / "buckets",
            layout.work / "minhash" / "clusters",
        )
        stages += [
            PipelineStage(
                "minhash_signature",
                [intermediate(current), CharacterMinhashSignature(str(signatures), settings)],
                tasks,
            ),
            PipelineStage(
                "minhash_buckets",
                [MinhashDedupBuckets(str(signatures), str(buckets), config=minhash)],
                settings.bands,
            ),
            PipelineStage(
                "minhash_verify",
                [
                    MinhashVerify(
                        str(buckets),
                        str(signatures),
                        str(layout.minhash_verified),
                        settings.min_jaccard,
                    )
                ],
                settings.bands,
            ),
            PipelineStage(
                "minhash_cluster",
                [MinhashCluster(str(layout.minhash_verified), str(signatures), str(clusters))],
                1,
            ),
            PipelineStage(
                "minhash_filter",
                [
                    intermediate(current),
                    MinhashDedupFilter(
                        str(clusters),
                        exclusion_writer=removed_writer(NEAR_DEDUP),
                        load_cluster_sizes=True,
                    ),
                    kept_writer(),
                ],
                tasks,
            ),
        ]
    return stages
