"""The quality classifier: a fastText model telling reference-like Japanese text (Wikipedia,
literature) from raw web text, its score as a datatrove step, and a threshold filter.

fastText (pip ``fasttext-wheel``) because Swallow corpus v2 and FineWeb-Edu-style pipelines use
it: a linear model over hashed n-grams that trains in seconds and scores thousands of
documents per second on one CPU core, with no GPU and no heavy dependency. Japanese has no
spaces and fastText splits on whitespace, so a text is given as its characters separated by
spaces and the model sees character n-grams (``word_ngrams``), like the rest of data_prep.

Under numpy 2, fasttext-wheel 0.9.2's ``predict`` fails on ``np.array(copy=False)``; the
scores are read from the same C++ call that ``predict`` wraps (``model.f.predict``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
from collections.abc import Mapping
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from common.errors import KinoeError

MODEL_FILE = "model.bin"
INFO_FILE = "classifier.json"
POSITIVE = "__label__reference"
NEGATIVE = "__label__web"
SCORE_KEY = "quality_score"
# Score bands of the report's histogram and samples (upper bounds; the last band is closed).
BANDS = tuple(round(0.1 * step, 1) for step in range(1, 11))


def fasttext_line(text: str, max_chars: int) -> str:
    """What the model reads: the first ``max_chars`` characters, whitespace dropped, spaced."""
    return " ".join("".join(text[:max_chars].split()))


def band_of(score: float) -> int:
    """Index of the 0.1-wide band holding ``score`` (0-1)."""
    return min(int(score * 10), 9)


def held_out(key: str, fraction: float, seed: int) -> bool:
    """Deterministic split by a document's key: the same document is always on the same side."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class QualityModel:
    """A trained classifier and how it reads text; ``score`` is P(reference-like), 0-1."""

    def __init__(self, folder: Path):
        import fasttext

        folder = Path(folder)
        info_path, model_path = folder / INFO_FILE, folder / MODEL_FILE
        if not info_path.is_file() or not model_path.is_file():
            raise KinoeError(
                f"quality model {folder} has no {MODEL_FILE} and {INFO_FILE}; train one with "
                "python -m data_prep.quality_train -c CONFIG and give its run directory"
            )
        self.info = json.loads(info_path.read_text())
        self.max_chars = int(self.info["max_chars"])
        # load_model prints a warning about its return type on every call; it says nothing here.
        with contextlib.redirect_stderr(io.StringIO()):
            self.model = fasttext.load_model(str(model_path))

    def score(self, text: str) -> float:
        labels = dict(
            (label, probability)
            for probability, label in self.model.f.predict(
                fasttext_line(text, self.max_chars) + "\n", 2, 0.0, "replace"
            )
        )
        return float(min(1.0, max(0.0, labels.get(POSITIVE, 0.0))))


class QualityScorer(PipelineStep):
    """Writes ``metadata["quality_score"]`` for documents of scored sources; keeps a histogram
    and a few samples per score band for the report."""

    name = "quality_score"
    type = "🏷 - SCORE"

    def __init__(
        self, model_folder: Path, scored_sources: set[str], tally_folder: Path, samples: int
    ):
        super().__init__()
        self.model_folder = Path(model_folder)
        self.scored_sources = set(scored_sources)
        self.tally_folder = Path(tally_folder)
        self.samples = samples
        self._model: QualityModel | None = None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self._model is None:  # loaded in the worker, not pickled with the pipeline
            self._model = QualityModel(self.model_folder)
        histogram = [0] * len(BANDS)
        samples: list[list[dict]] = [[] for _ in BANDS]
        for document in data:
            if document.metadata.get("source") in self.scored_sources:
                with self.track_time():
                    score = self._model.score(document.text)
                document.metadata[SCORE_KEY] = round(score, 4)
                band = band_of(score)
                histogram[band] += 1
                if len(samples[band]) < self.samples:
                    samples[band].append(
                        {
                            "id": document.id,
                            "source": document.metadata.get("source"),
                            "score": round(score, 4),
                            "text": document.text[:400],
                        }
                    )
            yield document
        self.tally_folder.mkdir(parents=True, exist_ok=True)
        (self.tally_folder / f"{rank:05d}.json").write_text(
            json.dumps({"histogram": histogram, "samples": samples}, ensure_ascii=False)
        )


def score_tallies(tally_folder: Path, samples: int) -> dict:
    """The score histogram over every task and up to ``samples`` documents per band."""
    histogram = [0] * len(BANDS)
    by_band: list[list[dict]] = [[] for _ in BANDS]
    for path in sorted(Path(tally_folder).glob("*.json")):
        tally = json.loads(path.read_text())
        histogram = [a + b for a, b in zip(histogram, tally["histogram"], strict=True)]
        for band, documents in enumerate(tally["samples"]):
            by_band[band] += documents[: samples - len(by_band[band])]
    return {"bands": list(BANDS), "histogram": histogram, "samples": by_band}


class QualityScoreFilter(BaseFilter):
    """Removes scored documents under their source's ``min_quality_score``."""

    name = "quality_classifier"

    def __init__(self, thresholds: Mapping[str, float], exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        self.thresholds = dict(thresholds)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        score = doc.metadata.get(SCORE_KEY)
        limit = self.thresholds.get(doc.metadata.get("source"), 0.0)
        if score is None or score >= limit:
            return True
        return False, f"quality_score {score:.3f} < {limit:.3f}"

    def stat_update(self, *labels: str, value: int = 1, unit: str | None = None) -> None:
        labels = tuple(
            label.split(" ", 1)[0] if label.startswith("dropped_") else label for label in labels
        )
        super().stat_update(*labels, value=value, unit=unit)


def shuffled(lines: list[str], seed: int) -> list[str]:
    """The lines in a seeded order (fastText reads its training file in order)."""
    ordered = list(lines)
    random.Random(seed).shuffle(ordered)
    return ordered
