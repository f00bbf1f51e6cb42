"""Export a kinoe SentencePiece model to a Hugging Face fast-tokenizer directory with identical ids.

kinoe trains SentencePiece (unigram or BPE) with the identity normaliser, no dummy prefix, spaces
kept, byte fallback, split digits, and ``"\\n"`` plus the chat tokens as user-defined symbols. The
export rebuilds each of those behaviours as a ``tokenizers`` pipeline:

- **Added tokens**: the user-defined symbols and the control pieces are matched in the raw text
  before anything else, as SentencePiece's prefix matcher does for user-defined symbols. The chat
  tokens and control pieces are special; ``"\\n"`` is an ordinary added token (it is text).
- **Normaliser**: only ``" "`` -> ``"▁"`` (SentencePiece's whitespace escaping); no prefix, no NFKC.
- **Pre-tokeniser**: splits where SentencePiece's trainer split its words, so that no piece can
  cross a split: before every run of ``"▁"`` (``split_by_whitespace``; the run stays with the word
  after it, so whitespace-only pieces such as ``"▁▁▁▁"`` stay reachable) and around every decimal
  digit (``split_digits``; SentencePiece's digits are ``0-9`` and ``０-９``). SentencePiece itself
  segments the whole text at once; ``check_pieces_fit`` proves on the vocabulary that splitting
  cannot change the result, and the export refuses a model where it could.
- **Model**: unigram: the pieces and scores, byte fallback, and pieces that SentencePiece never
  matches in text (bytes, control pieces) scored out of reach (``unreachable_score``). BPE: byte
  fallback and the merges replayed from the piece scores (``bpe_merges``).
- **Decoder**: ``"▁"`` -> ``" "``, byte fallback, fuse; nothing stripped.
- **Post-processor**: ``<s>`` prepended; no ``</s>``.

What Hugging Face cannot match exactly:

- **Unigram and floating point.** SentencePiece's Viterbi adds scores in float32 over the whole
  text; ``tokenizers`` adds them in float64. Equal-score segmentations (the same pieces in another
  order, e.g. ``ほ|ほほ`` against ``ほほ|ほ`` in a run of a repeated character or of spaces) are
  then decided by SentencePiece's rounding, and in long documents (thousands of characters) the
  float32 total loses enough precision to flip near-equal ones. Known and not fixed upstream
  (huggingface/tokenizers#1213, huggingface/transformers#15970). With exact sums both pick the same
  path, so ``quantise_unigram_scores`` (scores rounded to multiples of 1/16, whose float32 sums
  are exact) makes a unigram model reproducible; BPE adds no scores and matches exactly.
- **Literal control tokens.** transformers registers ``<s>``, ``</s>``, ``<pad>`` and ``<unk>``
  as special added tokens, so those strings written in text encode to their ids in Hugging Face,
  while SentencePiece spells them out. Loading with ``split_special_tokens=True`` spells them out
  the same way, but then the chat tokens in text are spelt out too.
- **BPE ranks.** SentencePiece ranks a merge by the score of the piece it makes, so two different
  pairs that make the same piece tie and the leftmost goes first; a merge list ranks every pair on
  its own. They can disagree only where both pairs compete over a shared symbol (``ab|a|ba`` ->
  ``aba``), which SentencePiece's left-to-right merging did not produce in stress tests.
- **Unigram byte pieces in text.** ``<0xE3>`` written in text is spelt out like SentencePiece only
  while every character of it is a piece of the model (true of any model trained on text with
  ASCII in it).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE, Unigram

from tokenizer.chat import CHAT_TOKENS

SPACE = "▁"  # U+2581, SentencePiece's escaped space
DIGITS = "0-9０-９"  # SentencePiece's is_unicode_decimal_number (trainer_interface.cc)
SPECIAL_TOKENS = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}
SPECIAL_IDS = {"unk_token": 0, "bos_token": 1, "eos_token": 2, "pad_token": 3}
MODEL_MAX_LENGTH = int(1e30)  # transformers' VERY_LARGE_INTEGER: no limit of the tokenizer's own
SCORE_STEP = 1 / 16  # quantise_unigram_scores: float32 sums exact up to 2**20 in magnitude

_Piece = spm_pb2.ModelProto.SentencePiece
_UNIGRAM, _BPE = spm_pb2.TrainerSpec.UNIGRAM, spm_pb2.TrainerSpec.BPE


class IdMismatch(NamedTuple):
    """One text on which the exported tokenizer and SentencePiece disagree.

    ``sp_ids`` and ``hf_ids`` are the two encodings without special tokens. When they differ, the
    ids mismatch; when they are equal, the decoding does: Hugging Face's ``decode(sp_ids)`` is not
    SentencePiece's. ``ids_differ`` tells the two cases apart.
    """

    text: str
    sp_ids: list[int]
    hf_ids: list[int]

    @property
    def ids_differ(self) -> bool:
        return self.sp_ids != self.hf_ids


def load_proto(model_path: Path) -> spm_pb2.ModelProto:
    """Read a SentencePiece ``.model`` file into its protobuf."""
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return proto


def check_supported(proto: spm_pb2.ModelProto) -> None:
    """Raise ValueError when the model was trained with options the export does not reproduce."""
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if spec.model_type not in (_UNIGRAM, _BPE):
        problems.append(f"model_type {spm_pb2.TrainerSpec.ModelType.Name(spec.model_type)}")
    if norm.precompiled_charsmap or norm.name != "identity":
        problems.append(f"normaliser {norm.name!r} (only 'identity')")
    if norm.add_dummy_prefix:
        problems.append("add_dummy_prefix")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces off")
    if spec.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix")
    if not spec.byte_fallback:
        problems.append("byte_fallback off")
    for key, piece in SPECIAL_TOKENS.items():
        index = SPECIAL_IDS[key]
        if len(proto.pieces) <= index or proto.pieces[index].piece != piece:
            problems.append(f"{key} is not {piece!r} at id {index}")
    if problems:
        raise ValueError("unsupported SentencePiece model: " + "; ".join(problems))


def pre_tokenizer(proto: spm_pb2.ModelProto) -> pre_tokenizers.PreTokenizer | None:
    """Split text where SentencePiece's trainer split words: before runs of ▁, around digits."""
    steps = []
    if proto.trainer_spec.split_by_whitespace:
        steps.append(pre_tokenizers.Split(Regex(f"{SPACE}+"), behavior="merged_with_next"))
    if proto.trainer_spec.split_digits:
        steps.append(pre_tokenizers.Split(Regex(f"[{DIGITS}]"), behavior="isolated"))
    return pre_tokenizers.Sequence(steps) if steps else None


def check_pieces_fit(
    proto: spm_pb2.ModelProto, splitter: pre_tokenizers.PreTokenizer | None
) -> None:
    """Raise ValueError if a normal piece spans a pre-tokeniser split or holds a non-piece character.

    Where the pre-tokeniser splits a string depends only on the characters around the split, so a
    piece it leaves whole is never cut in any text, and the segmentation of the whole text is the
    segmentation of its parts. Every character of a normal piece must be a piece itself, so that
    an unknown character is covered only by its own unknown node in both implementations.
    """
    normal = [p.piece for p in proto.pieces if p.type == _Piece.NORMAL]
    singles = {piece for piece in normal if len(piece) == 1}
    crossing = (
        [] if splitter is None else [p for p in normal if len(splitter.pre_tokenize_str(p)) > 1]
    )
    strangers = sorted({c for p in normal for c in p if c not in singles})
    if crossing or strangers:
        raise ValueError(
            f"SentencePiece pieces the export cannot reproduce: crossing a pre-tokeniser split "
            f"{crossing[:10]}; characters that are not pieces themselves {strangers[:10]}"
        )


def unreachable_score(piece: str, char_scores: dict[str, float], floor: float) -> float:
    """A unigram score that keeps ``piece`` off every best path when it is written in text.

    SentencePiece's lattice holds only normal and user-defined pieces; ``tokenizers`` puts every
    vocabulary entry in its lattice, so ``<0x41>`` (score 0 in the model) would beat its spelling.
    Below the score of its single characters, the spelling always wins instead.
    """
    return sum(char_scores.get(c, floor) for c in piece) - 1.0


def unigram_model(proto: spm_pb2.ModelProto) -> Unigram:
    """The unigram model: every piece at its id, byte fallback, non-text pieces out of reach.

    User-defined pieces are out of reach too: the added tokens match them before the model runs,
    and with ``split_special_tokens=True`` the chat tokens are then spelt out, not matched.
    """
    normal = [p for p in proto.pieces if p.type == _Piece.NORMAL]
    char_scores = {p.piece: p.score for p in normal if len(p.piece) == 1}
    floor = min(p.score for p in normal)
    vocab = [
        (
            p.piece,
            p.score if p.type == _Piece.NORMAL else unreachable_score(p.piece, char_scores, floor),
        )
        for p in proto.pieces
    ]
    return Unigram(vocab, unk_id=SPECIAL_IDS["unk_token"], byte_fallback=True)


def bpe_merges(proto: spm_pb2.ModelProto) -> list[tuple[str, str]]:
    """Merges that replay SentencePiece's BPE encoding, first merge first.

    SentencePiece stores no merges: it repeatedly joins the adjacent pair whose concatenation is
    the highest-scoring piece (leftmost on ties). So every way of splitting a normal piece into two
    normal pieces is a merge, ranked by the piece's score, then id, then the cut's position.
    """
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _Piece.NORMAL}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def bpe_model(proto: spm_pb2.ModelProto) -> BPE:
    """The BPE model: every piece at its id, the replayed merges, byte fallback."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    return BPE(
        vocab,
        bpe_merges(proto),
        unk_token=SPECIAL_TOKENS["unk_token"],
        byte_fallback=True,
        fuse_unk=False,
        dropout=None,
    )


def build_tokenizer(proto: spm_pb2.ModelProto) -> Tokenizer:
    """The ``tokenizers`` pipeline that reproduces SentencePiece's encoding of ``proto``."""
    check_supported(proto)
    splitter = pre_tokenizer(proto)
    check_pieces_fit(proto, splitter)
    is_bpe = proto.trainer_spec.model_type == _BPE
    tokenizer = Tokenizer(bpe_model(proto) if is_bpe else unigram_model(proto))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    if splitter is not None:
        tokenizer.pre_tokenizer = splitter
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, SPECIAL_IDS["bos_token"])],
    )
    control = (_Piece.CONTROL, _Piece.UNKNOWN)
    special = [p.piece for p in proto.pieces if p.type in control or p.piece in CHAT_TOKENS]
    plain = [
        p.piece for p in proto.pieces if p.type == _Piece.USER_DEFINED and p.piece not in special
    ]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return tokenizer


def export_hf_tokenizer(model_path: Path, out_dir: Path, chat_template: str) -> Path:
    """Write a Hugging Face tokenizer directory for the SentencePiece model; return ``out_dir``.

    ``AutoTokenizer.from_pretrained(out_dir)`` gives a fast tokenizer with SentencePiece's ids,
    ``<s>`` prepended by default, the chat tokens as special tokens and ``chat_template``. Files:
    ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` as transformers 5
    saves them, ``special_tokens_map.json`` for older readers, and the model as ``tokenizer.model``.
    The BOS rule lives in tokenizer.json's post-processor: transformers 5 ignores ``add_bos_token``
    in tokenizer_config.json next to a tokenizer.json (``tokenizer.add_bos_token`` reads False).
    """
    from transformers import TokenizersBackend

    model_path, out_dir = Path(model_path), Path(out_dir)
    proto = load_proto(model_path)
    chat_tokens = [p.piece for p in proto.pieces if p.piece in CHAT_TOKENS]
    hf = TokenizersBackend(
        tokenizer_object=build_tokenizer(proto),
        **SPECIAL_TOKENS,
        extra_special_tokens=chat_tokens,
        chat_template=chat_template,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    special_map = {**SPECIAL_TOKENS, "additional_special_tokens": chat_tokens}
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    shutil.copyfile(model_path, out_dir / "tokenizer.model")
    return out_dir


def id_mismatches(model_path: Path, hf_dir: Path, texts: Iterable[str]) -> list[IdMismatch]:
    """The texts on which SentencePiece and the exported directory disagree, in input order.

    For each text, SentencePiece's ``encode(text)`` against ``AutoTokenizer(...)(text,
    add_special_tokens=False).input_ids``, and SentencePiece's ``decode(sp_ids)`` against Hugging
    Face's ``decode(sp_ids)``. Each disagreement is one ``IdMismatch(text, sp_ids, hf_ids)``: the
    ids differ when ``sp_ids != hf_ids``; when they are equal, the decoding differs.
    """
    from transformers import AutoTokenizer

    texts = list(texts)
    if not texts:
        return []
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    sp_batch = sp.encode(texts)
    hf_batch = hf(texts, add_special_tokens=False).input_ids
    return [
        IdMismatch(text, sp_ids, hf_ids)
        for text, sp_ids, hf_ids in zip(texts, sp_batch, hf_batch, strict=True)
        if sp_ids != hf_ids or sp.decode(sp_ids) != hf.decode(sp_ids)
    ]


def quantise_unigram_scores(model_path: Path, out_path: Path, step: float = SCORE_STEP) -> int:
    """Round a unigram model's piece scores to multiples of ``step``; return how many changed.

    SentencePiece adds unigram scores in float32, so which of two equal-scoring segmentations it
    picks, and in long texts which of two nearly equal ones, depends on rounding that
    ``tokenizers`` (float64) cannot reproduce. Multiples of 1/16 add up exactly in float32 until
    the total passes 2**20 (some 100,000 pieces of text), and with exact sums both break ties the
    same way. (SentencePiece adds a fixed -0.1 for each user-defined symbol such as the newline,
    which can still round where the total crosses a power of two; no mismatch came of it on the
    bundled Aozora works, up to 109,000 characters each.) The change to each score (at most
    ``step / 2``) barely moves the segmentation, but it is a new model: encode and export with
    the rounded one. ``step`` must be a power of two.
    """
    if step <= 0 or math.log2(step) != int(math.log2(step)):
        raise ValueError(f"step {step} is not a power of two")
    proto = load_proto(model_path)
    if proto.trainer_spec.model_type != _UNIGRAM:
        raise ValueError("only unigram models add scores; BPE needs no rounding")
    changed = 0
    for piece in proto.pieces:
        if piece.type == _Piece.NORMAL:
            rounded = round(piece.score / step) * step
            changed += rounded != piece.score
            piece.score = rounded
    Path(out_path).write_bytes(proto.SerializeToString())
    return changed
