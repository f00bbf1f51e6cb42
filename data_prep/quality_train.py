"""``python -m data_prep.quality_train -c CONFIG``: train the quality classifier on the team's data.

Positives are reference-like text (Wikipedia, Aozora works), negatives raw web pages, as
Swallow corpus v2 did. Every document is read with the data_prep readers, normalised with
its source's settings (what the scoring step sees inside ``kinoe data``), and cut into pieces
of ``piece_chars`` so that long works and short leads give comparable examples. Documents are
split into train and held-out by a hash of their id (their pieces stay together); classes are
balanced by a seeded sample; fastText trains on one thread with a fixed seed, so the same
config and data give the same model bytes.

<run.root>/quality/<run.name>/  model.bin, classifier.json (how to read text, labels,
                                 figures), report.json, manifest.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from common.command import add_stage_arguments, run_stage_command
from common.config import Config
from common.errors import KinoeError
from common.manifest import write_json_atomic
from common.run import Stage, StageConfig, StageContext
from data_prep.config import SourceConfig, source_inputs
from data_prep.quality_model import (
    INFO_FILE,
    MODEL_FILE,
    NEGATIVE,
    POSITIVE,
    QualityModel,
    fasttext_line,
    held_out,
    shuffled,
)

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class FastTextSettings(Config):
    """fastText's supervised training options (its names, snake case)."""

    epoch: int = Field(30, ge=1)
    lr: float = Field(0.5, gt=0)
    word_ngrams: int = Field(3, ge=1, description="Character n-grams, as characters are words here")
    dim: int = Field(32, ge=1)
    bucket: int = Field(
        100_000,
        ge=1000,
        description="Hash buckets for the n-grams (model size: bucket x dim x 4 bytes)",
    )
    min_count: int = Field(1, ge=1)


class QualityTrainConfig(StageConfig):
    """Which documents are positives and negatives, how they are cut, split and learned."""

    positives: list[SourceConfig] = Field(
        min_length=1, description="Reference-like sources (Wikipedia, literature)"
    )
    negatives: list[SourceConfig] = Field(min_length=1, description="Raw web sources")
    piece_chars: int = Field(
        200,
        ge=20,
        description="Documents are cut into pieces of this many characters; the "
        "scoring step reads the first piece of each document",
    )
    min_piece_chars: int = Field(10, ge=1, description="Shorter pieces are dropped")
    max_pieces_per_class: int = Field(50_000, ge=10)
    held_out_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    fasttext: FastTextSettings = Field(default_factory=FastTextSettings)


def read_pieces(source: SourceConfig, piece_chars: int, min_chars: int) -> dict[str, list[str]]:
    """The source's readable documents, normalised, as pieces by document id."""
    from data_prep.normalise import normalise_text
    from data_prep.sources import reader_for

    pieces: dict[str, list[str]] = {}
    for document in reader_for(source).run(None, 0, 1):
        if document.metadata.get("read_error"):
            continue
        text = normalise_text(document.text, source.normalise)
        cut = [text[i : i + piece_chars] for i in range(0, len(text), piece_chars)]
        cut = [piece for piece in cut if len("".join(piece.split())) >= min_chars]
        if cut:
            pieces[f"{source.name}:{document.id}"] = cut
    return pieces


def balanced_sample(pieces: list[tuple[str, str]], size: int, seed: int) -> list[str]:
    """``size`` pieces drawn in turn from each source (seeded), so that a source with many
    pieces (Aozora's long works) does not stand for the whole class."""
    by_source: dict[str, list[str]] = {}
    for source, piece in pieces:
        by_source.setdefault(source, []).append(piece)
    queues = [shuffled(by_source[name], seed) for name in sorted(by_source)]
    chosen: list[str] = []
    while len(chosen) < size and any(queues):
        for queue in queues:
            if queue and len(chosen) < size:
                chosen.append(queue.pop())
    return chosen


def train(context: StageContext[QualityTrainConfig]) -> dict[str, Any]:
    """Read, split, balance, train, evaluate; returns the figures for the manifest."""
    import fasttext

    config, run_dir = context.config, context.run_dir
    examples: dict[str, dict[str, list[tuple[str, str]]]] = {
        side: {POSITIVE: [], NEGATIVE: []} for side in ("train", "held_out")
    }
    held_out_documents: dict[str, list[str]] = {}
    for label, sources in ((POSITIVE, config.positives), (NEGATIVE, config.negatives)):
        for source in sources:
            documents = read_pieces(source, config.piece_chars, config.min_piece_chars)
            if not documents:
                raise KinoeError(
                    f"quality_train: source {source.name!r} has no readable documents under "
                    f"{source.path}; fix its path, glob or kind"
                )
            for key, pieces in documents.items():
                side = (
                    "held_out" if held_out(key, config.held_out_fraction, config.seed) else "train"
                )
                examples[side][label] += [(source.name, piece) for piece in pieces]
                if side == "held_out":
                    held_out_documents.setdefault(source.name, []).append(pieces[0])
    # Balanced classes: as many pieces of each, drawn with the seed.
    train_size = min(len(v) for v in examples["train"].values())
    train_size = min(train_size, config.max_pieces_per_class)
    lines = []
    for label, pieces in examples["train"].items():
        chosen = balanced_sample(pieces, train_size, config.seed)
        lines += [f"{label} {fasttext_line(piece, config.piece_chars)}" for piece in chosen]
    train_file = run_dir / "train.txt"
    train_file.write_text("\n".join(shuffled(lines, config.seed)) + "\n", encoding="utf-8")
    settings = config.fasttext
    model = fasttext.train_supervised(
        str(train_file),
        epoch=settings.epoch,
        lr=settings.lr,
        wordNgrams=settings.word_ngrams,
        dim=settings.dim,
        bucket=settings.bucket,
        minCount=settings.min_count,
        thread=1,  # one thread: fastText's updates are then in a fixed order
        seed=config.seed,
        verbose=0,
    )
    model.save_model(str(run_dir / MODEL_FILE))
    train_file.unlink()  # the pieces are the corpora's text; the model is what is kept
    info = {
        "labels": {"positive": POSITIVE, "negative": NEGATIVE},
        "max_chars": config.piece_chars,
        "input": "characters separated by spaces, whitespace dropped (data_prep.quality_model)",
        "train_pieces_per_class": train_size,
    }
    write_json_atomic(run_dir / INFO_FILE, info)

    scorer = QualityModel(run_dir)
    correct = {POSITIVE: [0, 0], NEGATIVE: [0, 0]}
    for label, pieces in examples["held_out"].items():
        for _, piece in pieces:
            predicted = POSITIVE if scorer.score(piece) >= 0.5 else NEGATIVE
            correct[label][0] += predicted == label
            correct[label][1] += 1
    recall = {label: hits / max(1, total) for label, (hits, total) in correct.items()}
    kept_share = {}
    for source, firsts in sorted(held_out_documents.items()):
        scores = [scorer.score(piece) for piece in firsts]
        kept_share[source] = {
            f"{t:.1f}": round(sum(s >= t for s in scores) / len(scores), 4) for t in THRESHOLDS
        }
    figures = {
        "held_out_pieces": {label: total for label, (_, total) in correct.items()},
        "held_out_accuracy_balanced": round(sum(recall.values()) / 2, 4),
        "held_out_recall": {label: round(value, 4) for label, value in recall.items()},
        "held_out_documents_kept_per_threshold": kept_share,
        "train_pieces_per_class": train_size,
    }
    write_json_atomic(run_dir / "report.json", figures)
    write_json_atomic(run_dir / INFO_FILE, info | {"held_out": figures})
    context.logger.info(
        "quality_train: held-out balanced accuracy %.3f (%s); model in %s",
        figures["held_out_accuracy_balanced"],
        ", ".join(f"{k} {v:.3f}" for k, v in figures["held_out_recall"].items()),
        run_dir,
    )
    return figures


def _inputs(config: QualityTrainConfig) -> dict[str, Path]:
    return source_inputs(config.positives, "positives") | source_inputs(
        config.negatives, "negatives"
    )


STAGE = Stage("quality", QualityTrainConfig, train, inputs=_inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.quality_train", description=__doc__)
    add_stage_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_stage_command(STAGE, args)
    except KinoeError as error:
        print(f"quality_train: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
