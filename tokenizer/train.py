"""SentencePiece training with the options kinoe sets (each one explained in docs/tokenizer.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizer.chat import CHAT_TOKENS
from tokenizer.config import TrainerConfig

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# A newline is one piece of its own: documents keep their line structure, and the pretraining
# data (which joins lines with \n) costs one token per line break instead of a byte sequence.
NEWLINE = "\n"
USER_DEFINED_SYMBOLS = (NEWLINE, *CHAT_TOKENS)
# SentencePiece marks spaces with U+2581; requiring it keeps a space one piece (not three
# byte-fallback pieces that would decode to a literal U+2581) even when the sample has few spaces.
WHITESPACE_PIECE = "\u2581"


def trainer_options(config: TrainerConfig, input_path: Path, model_prefix: Path) -> dict[str, Any]:
    """Every option kinoe passes to SentencePieceTrainer, from the config plus fixed choices."""
    return {
        "input": str(input_path),
        "model_prefix": str(model_prefix),
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "character_coverage": config.character_coverage,
        "byte_fallback": config.byte_fallback,
        "split_digits": config.split_digits,
        "max_sentencepiece_length": config.max_piece_length,
        "max_sentence_length": config.max_sentence_length,
        "input_sentence_size": config.input_sentence_size,
        "shuffle_input_sentence": config.shuffle_input_sentence,
        "seed_sentencepiece_size": config.seed_sentencepiece_size,
        "num_threads": config.num_threads,
        # Text arrives NFKC-normalised from data_prep; a second normaliser here would make the
        # model's ids depend on a rule the Hugging Face export must reimplement exactly.
        "normalization_rule_name": "identity",
        "add_dummy_prefix": False,
        "remove_extra_whitespaces": False,
        "split_by_whitespace": True,
        "allow_whitespace_only_pieces": True,
        "required_chars": WHITESPACE_PIECE,
        "user_defined_symbols": list(USER_DEFINED_SYMBOLS),
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "pad_id": PAD_ID,
        "unk_piece": UNK,
        "bos_piece": BOS,
        "eos_piece": EOS,
        "pad_piece": PAD,
        "hard_vocab_limit": True,
        "minloglevel": 1,
    }


def train(config: TrainerConfig, input_path: Path, model_prefix: Path) -> dict[str, Any]:
    """Train; writes ``<prefix>.model`` and ``<prefix>.vocab``. Returns the options used."""
    import sentencepiece as spm

    options = trainer_options(config, input_path, model_prefix)
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as error:
        from common.errors import KinoeError

        reason = str(error).strip().splitlines()[-1]
        # "Vocabulary size is smaller than required_chars": every character the coverage keeps
        # needs a piece. Otherwise (e.g. "Vocabulary size too high") the sample is too small.
        fix = (
            "raise trainer.vocab_size or lower trainer.character_coverage (0.98 at least)"
            if "required_chars" in reason
            else "raise sample.character_budget or lower trainer.vocab_size"
        )
        raise KinoeError(
            f"tokenizer train: SentencePiece refused the sample ({reason}); {fix}"
        ) from None
    if config.model_type == "unigram":
        _round_scores(model_prefix)
    return options


def _round_scores(model_prefix: Path) -> None:
    """Round unigram scores so the Hugging Face export picks the very same segmentations.

    SentencePiece sums piece scores in float32 and ``tokenizers`` in float64; on near-ties
    (long texts, repeated kana, runs of dots) they then choose different paths. Scores on a
    grid of 1/16 sum exactly in both (tokenizer/hf_export.py says how far that holds), at a
    cost of at most 1/32 per piece's log-probability. The .vocab file is rewritten to match.
    """
    import sentencepiece as spm

    from tokenizer.hf_export import quantise_unigram_scores

    model = Path(f"{model_prefix}.model")
    quantise_unigram_scores(model, model)
    processor = spm.SentencePieceProcessor(model_file=str(model))
    lines = (
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
        for i in range(processor.get_piece_size())
    )
    Path(f"{model_prefix}.vocab").write_text("".join(lines), encoding="utf-8")
