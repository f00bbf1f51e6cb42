"""DPO's reference log-probabilities: computed once before the first step and saved with the run."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.errors import KinoeError
from finetune.config import FinetuneConfig, LoraConfig
from finetune.examples import Unit
from finetune.held_out import PAD_ID, equal_shares
from finetune.model import build_model, open_model_source
from finetune.packing import collate, evaluation_batches, segment_logps
from training import safe_load
from training.digests import file_damage, record_digest
from training.losses import token_loss_function
from training.world import World

REFERENCE_FILE = "reference_logps.pt"


def reference_logps(
    config: FinetuneConfig,
    units: list[Unit],
    engine: Any,
    world: World,
    run_dir: Path,
    resume_step: int | None,
    logger: logging.Logger,
) -> torch.Tensor:
    """Log-probabilities (units, 2), float64, of each pair's chosen and rejected answer under the reference.

    Computed once, before the first step, with the starting weights (or ``dpo.reference``) and
    saved in the run directory with its SHA-256 beside it: a resumed run must not take its
    already-trained weights for the reference, nor a damaged file for it.
    """
    path = run_dir / REFERENCE_FILE
    problem = file_damage(path) if path.is_file() else f"{path} is missing"
    if problem is None:
        stored = safe_load.load(path, "delete it and restart without checkpoints to recompute it")
        if isinstance(stored, torch.Tensor) and stored.shape == (len(units), 2):
            return stored
        problem = f"{path} does not match the data ({len(units)} pairs)"
    if resume_step is not None:
        raise KinoeError(
            f"{problem}, and the run has checkpoints: the "
            "reference log-probabilities of the starting model cannot be recomputed from trained "
            "weights; restore the file or start a new run (checkpoint.resume=none with a new run.name)"
        )
    if path.is_file() and world.is_main:
        logger.warning("%s; computing the reference log-probabilities again", problem)
    _, data_config, train_config = config.training()
    reference = torch.zeros(len(units), 2, dtype=torch.float64)
    scorer = engine
    if config.dpo.reference is not None:
        # The reference computes as the policy does (same training overrides), without adapters.
        reference_model = config.model.model_copy(
            update={"path": config.dpo.reference, "lora": LoraConfig()}
        )
        other = open_model_source(reference_model)
        scorer = build_model(other, reference_model, 0, logger).to(world.device)
        scorer = scorer.to(next(engine.module.parameters()).dtype)
    scorer.eval()
    loss = token_loss_function(config.engine)
    started = time.perf_counter()
    with torch.no_grad():
        shares = evaluation_batches(
            len(units),
            [u.length for u in units],
            data_config.max_length,
            data_config.packing,
            world.rank,
            world.size,
            train_config.micro_batch_size,
        )
        for micro in equal_shares(shares, world):
            batch = collate(units, micro, data_config.max_length, PAD_ID).to(world.device)
            logits_BTV = scorer(batch.input_ids_BT, batch.document_ids_BT)
            token_loss_BT = loss(logits_BTV, batch.labels_BT)
            # A one-off pass before training: reading each micro-batch back here costs nothing.
            logps_S = segment_logps(token_loss_BT.double(), batch).cpu()
            for index, unit in enumerate(batch.units):
                reference[unit] = logps_S[2 * index : 2 * index + 2]
    engine.train()
    reduced = reference.to(world.device)
    dist.all_reduce(reduced)
    reference = reduced.cpu()
    if world.is_main:
        torch.save(reference, path)
        record_digest(path)
        logger.info(
            "reference log-probabilities of %d pairs computed in %.1f s",
            len(units),
            time.perf_counter() - started,
        )
    if scorer is not engine:
        del scorer
    return reference
