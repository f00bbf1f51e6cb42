"""The objectives alone: language modelling's per-source sums, SFT's assistant-only loss, DPO's
pair loss against reference log-probabilities; none reads the device back per micro-batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finetune.examples import Segment, Unit
from finetune.objectives import DirectPreference, SupervisedFineTuning
from finetune.packing import collate
from models.mistral import Mistral
from models.mistral.args import tiny
from pretrain.data.loader import make_batch
from pretrain.objective import LanguageModelling
from training.losses import IGNORE, next_token_losses

EOS = 2


def _model(device: str = "cpu") -> Mistral:
    torch.manual_seed(0)
    with torch.device(device):
        return Mistral(tiny())


def _lm_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 500, size=(4, 33))
    tokens[1, 10] = EOS  # two documents in the second sample
    return make_batch(tokens, np.array([0, 1, 0, 1]), np.arange(4), EOS, document_masking=True)


def _units() -> list[Unit]:
    """Two SFT examples: a prompt (not trained) then an answer (trained)."""
    first = Segment(ids=[1, 5, 6, 7, 8, 9, 10], trained=[False] * 4 + [True] * 3)
    second = Segment(ids=[1, 11, 12, 13, 14], trained=[False, False, False, True, True])
    return [Unit((first,), "a:1"), Unit((second,), "a:2")]


def _pairs() -> list[Unit]:
    """Two DPO pairs: (chosen, rejected) answers to the same prompt."""
    prompt = [1, 20, 21, 22]
    units = []
    for chosen, rejected in (([30, 31], [40]), ([32], [41, 42, 43])):
        segments = tuple(
            Segment(ids=prompt + answer, trained=[False] * len(prompt) + [True] * len(answer))
            for answer in (chosen, rejected)
        )
        units.append(Unit(segments, "p:1"))
    return units


def test_language_modelling_sums_per_source_and_the_mean_loss():
    model, batch = _model(), _lm_batch()
    objective = LanguageModelling(["web", "wiki"], next_token_losses)
    sums = torch.zeros(objective.num_sums, dtype=torch.float64)
    loss = objective.loss(model, batch, sums)

    token_loss_BT = next_token_losses(
        model(batch.input_ids_BT, batch.document_ids_BT), batch.labels_BT
    )
    targets_B = (batch.labels_BT != IGNORE).sum(dim=1)
    assert targets_B[1] == 31  # the EOS predicts nothing across the document boundary
    assert loss.item() == pytest.approx((token_loss_BT.sum() / targets_B.sum()).item(), rel=1e-6)
    figures = objective.figures(sums.tolist())
    web, wiki = [0, 2], [1, 3]
    assert figures.tokens_by_source == {"web": 64, "wiki": 63}
    assert figures.samples_by_source == {"web": 2, "wiki": 2}
    assert figures.tokens == 127
    assert figures.loss_by_source["wiki"] == pytest.approx(
        (token_loss_BT[wiki].sum() / targets_B[wiki].sum()).item(), rel=1e-6
    )
    assert figures.loss_by_source["web"] == pytest.approx(
        (token_loss_BT[web].sum() / targets_B[web].sum()).item(), rel=1e-6
    )
    assert figures.loss == pytest.approx(loss.item(), rel=1e-6)


def test_sft_trains_the_assistant_tokens_only_and_scales_to_the_global_mean():
    model, units = _model(), _units()
    batch = collate(units, [(0, 1)], 16, 0)
    batch.loss_scale = 0.2
    objective = SupervisedFineTuning(next_token_losses)
    sums = torch.zeros(objective.num_sums, dtype=torch.float64)
    loss = objective.loss(model, batch, sums)

    logits_BTV = model(batch.input_ids_BT, batch.document_ids_BT)
    trained = batch.labels_BT != IGNORE
    assert trained.sum() == 5  # 3 + 2 answer tokens; prompts and padding are not trained
    expected = F.cross_entropy(logits_BTV[trained], batch.labels_BT[trained], reduction="sum")
    assert loss.item() == pytest.approx(0.2 * expected.item(), rel=1e-5)
    figures = objective.figures(sums.tolist())
    assert figures.loss == pytest.approx(expected.item() / 5, rel=1e-5)
    assert (figures.tokens, figures.samples_by_source) == (10, {"train": 2})


def test_dpo_loss_and_rewards_against_the_reference():
    model, units = _model(), _pairs()
    batch = collate(units, [(0, 1)], 32, 0)
    batch.reference_P2 = torch.tensor([[-9.0, -4.0], [-5.0, -12.0]], dtype=torch.float64)
    objective = DirectPreference(next_token_losses, beta=0.1)
    sums = torch.zeros(objective.num_sums, dtype=torch.float64)
    loss = objective.loss(model, batch, sums)

    token_loss_BT = next_token_losses(
        model(batch.input_ids_BT, batch.document_ids_BT), batch.labels_BT
    )
    logps = [-token_loss_BT[batch.segment_BT == s].sum().item() for s in range(4)]
    margins = [
        0.1 * ((logps[0] + 9.0) - (logps[1] + 4.0)),
        0.1 * ((logps[2] + 5.0) - (logps[3] + 12.0)),
    ]
    pair_losses = [-F.logsigmoid(torch.tensor(m)).item() for m in margins]
    assert loss.item() == pytest.approx(sum(pair_losses), rel=1e-5)
    figures = objective.figures(sums.tolist())
    assert figures.loss == pytest.approx(sum(pair_losses) / 2, rel=1e-5)
    assert figures.extra["reward_margin"] == pytest.approx(sum(margins) / 2, rel=1e-5)
    assert figures.extra["reward_accuracy"] == sum(m > 0 for m in margins) / 2
    assert figures.samples_by_source == {"train": 2}


def test_no_objective_reads_the_device_during_a_micro_batch():
    """On the meta device every host read (.item(), .tolist(), .cpu(), a bool of a tensor) raises,
    so this fails as soon as an objective syncs with the device per micro-batch."""
    model = _model("meta")
    meta = torch.device("meta")
    lm = LanguageModelling(["web", "wiki"], next_token_losses)
    sft, dpo = SupervisedFineTuning(next_token_losses), DirectPreference(next_token_losses, 0.1)
    pairs = collate(_pairs(), [(0, 1)], 32, 0)
    pairs.reference_P2 = torch.zeros(2, 2, dtype=torch.float64)
    cases = [
        (lm, _lm_batch().to(meta)),
        (sft, collate(_units(), [(0, 1)], 16, 0).to(meta)),
        (dpo, pairs.to(meta)),
    ]
    for objective, batch in cases:
        sums = torch.zeros(objective.num_sums, dtype=torch.float64, device=meta)
        loss = objective.loss(model, batch, sums)
        assert loss.device == meta and sums.device == meta
