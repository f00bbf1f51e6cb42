"""Packing units into fixed-length sequences, the order of a whole run, and the batches a rank sees.

Each epoch shuffles the training units (seed + epoch) and fills sequences of ``max_length``
positions in that order, starting a new sequence when the next unit does not fit. Every
segment keeps its own document id, so the model's document masking keeps attention inside it
and restarts RoPE positions, as if it were alone. With packing off each unit gets its own
sequence. The plan is a pure function of the units, seed, epochs and batch size: every rank
computes the same plan, and a resumed run continues at its step.

A step takes ``global_batch_size`` sequences; rank ``r`` takes a contiguous slice of them, as in
pretraining. The last step of the run is filled up with empty sequences (no targets).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from dataclasses import dataclass

import torch

from finetune.examples import Unit

IGNORE = -100


@dataclass(frozen=True)
class Plan:
    """Every training sequence of the run, in order: each a tuple of unit indices."""

    sequences: list[tuple[int, ...]]
    global_batch_size: int
    sequences_per_epoch: list[int]

    @property
    def steps(self) -> int:
        return max(1, math.ceil(len(self.sequences) / self.global_batch_size))

    def step_sequences(self, step: int) -> list[tuple[int, ...]]:
        """The ``global_batch_size`` sequences of 0-based ``step`` (empty ones past the end)."""
        start = step * self.global_batch_size
        chosen = self.sequences[start : start + self.global_batch_size]
        return chosen + [()] * (self.global_batch_size - len(chosen))

    def identity(self) -> dict[str, object]:
        """What a checkpoint records: resuming with another plan would repeat or skip examples."""
        digest = hashlib.sha256(repr(self.sequences).encode()).hexdigest()[:16]
        return {"sequences": len(self.sequences), "plan_sha256": digest}


def pack(
    lengths: list[int], order: list[int], max_length: int, packing: bool
) -> list[tuple[int, ...]]:
    """Units (by index into ``lengths``) in ``order``, grouped into sequences of at most ``max_length``."""
    sequences: list[tuple[int, ...]] = []
    current: list[int] = []
    used = 0
    for index in order:
        length = lengths[index]
        if current and (not packing or used + length > max_length):
            sequences.append(tuple(current))
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        sequences.append(tuple(current))
    return sequences


def training_plan(
    units: list[Unit],
    epochs: int,
    seed: int,
    max_length: int,
    packing: bool,
    global_batch_size: int,
) -> Plan:
    """The run's sequences: each epoch a fresh shuffle of the units, packed."""
    lengths = [unit.length for unit in units]
    sequences: list[tuple[int, ...]] = []
    per_epoch = []
    for epoch in range(epochs):
        order = list(range(len(units)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        packed = pack(lengths, order, max_length, packing)
        per_epoch.append(len(packed))
        sequences.extend(packed)
    return Plan(sequences, global_batch_size, per_epoch)


@dataclass
class Batch:
    """A micro-batch of packed sequences, shape (B, T) with T = max_length.

    ``segment_BT`` numbers the segments of the micro-batch in order (-1 on padding), so sums
    per example are an ``index_add`` away; ``segments`` is how many there are. ``tokens`` (real,
    not padding) and ``targets`` (trained labels) are counted here, on the host, so the training
    step need not read them back from the device.
    """

    input_ids_BT: torch.Tensor
    labels_BT: torch.Tensor
    document_ids_BT: torch.Tensor
    segment_BT: torch.Tensor
    segments: int
    units: list[int]  # the unit index of each segment group, in order
    tokens: int
    targets: int
    # Training: the summed loss is multiplied by this, world size x micro-batches over the
    # step's count of targets (SFT) or pairs (DPO), so the gradient is their mean however the
    # step's sequences fall on ranks and micro-batches (DeepSpeed divides by the first part).
    loss_scale: float = 1.0
    # DPO: each unit's reference log-probabilities (P, 2), chosen then rejected, float64.
    reference_P2: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        """The same batch on ``device``; copies are queued, the host does not wait for them."""
        return dataclasses.replace(
            self,
            input_ids_BT=self.input_ids_BT.to(device, non_blocking=True),
            labels_BT=self.labels_BT.to(device, non_blocking=True),
            document_ids_BT=self.document_ids_BT.to(device, non_blocking=True),
            segment_BT=self.segment_BT.to(device, non_blocking=True),
            reference_P2=None
            if self.reference_P2 is None
            else self.reference_P2.to(device, non_blocking=True),
        )


def collate(
    units: list[Unit], sequences: list[tuple[int, ...]], max_length: int, pad_id: int
) -> Batch:
    """Tensors for ``sequences`` (tuples of unit indices); inputs are each segment's ids but the last."""
    rows = len(sequences)
    input_ids = torch.full((rows, max_length), pad_id, dtype=torch.long)
    labels = torch.full((rows, max_length), IGNORE, dtype=torch.long)
    documents = torch.zeros((rows, max_length), dtype=torch.long)
    segment_of = torch.full((rows, max_length), -1, dtype=torch.long)
    segment = 0
    order: list[int] = []
    for row, indices in enumerate(sequences):
        position = 0
        document = 0
        for index in indices:
            order.append(index)
            for piece in units[index].segments:
                end = position + piece.length
                ids = torch.tensor(piece.ids, dtype=torch.long)
                trained = torch.tensor(piece.trained, dtype=torch.bool)
                input_ids[row, position:end] = ids[:-1]
                labels[row, position:end] = torch.where(trained[1:], ids[1:], IGNORE)
                documents[row, position:end] = document
                segment_of[row, position:end] = segment
                position, document, segment = end, document + 1, segment + 1
        # Padding is a document of its own: it attends to nothing real.
        documents[row, position:] = document
    tokens, targets = int((segment_of >= 0).sum()), int((labels != IGNORE).sum())
    return Batch(input_ids, labels, documents, segment_of, segment, order, tokens, targets)


def targets_in(units: list[Unit], sequences: list[tuple[int, ...]]) -> int:
    """Trained tokens in ``sequences``."""
    return sum(
        piece.targets
        for indices in sequences
        for index in indices
        for piece in units[index].segments
    )


def rank_micro_batches(
    sequences: list[tuple[int, ...]], rank: int, world_size: int, micro_batch_size: int
) -> list[list[tuple[int, ...]]]:
    """This rank's contiguous slice of a step's sequences, cut into micro-batches."""
    share = len(sequences) // world_size
    mine = sequences[rank * share : (rank + 1) * share]
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def evaluation_batches(
    count: int,
    lengths: list[int],
    max_length: int,
    packing: bool,
    rank: int,
    world_size: int,
    micro_batch_size: int,
) -> list[list[tuple[int, ...]]]:
    """Held-out units packed in file order; sequence ``i`` goes to rank ``i % world_size``."""
    sequences = pack(lengths, list(range(count)), max_length, packing)
    mine = sequences[rank::world_size]
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def segment_logps(token_loss_BT: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Log-probability (S,) of each segment's trained tokens: minus their summed token losses.

    Token losses are 0 where the label is not trained, so no mask is needed; padding (segment
    -1) is summed into a slot of its own and dropped, which keeps this free of host syncs.
    """
    slots_BT = batch.segment_BT + 1
    sums = torch.zeros(batch.segments + 1, dtype=token_loss_BT.dtype, device=token_loss_BT.device)
    return -sums.index_add(0, slots_BT.flatten(), token_loss_BT.flatten())[1:]
