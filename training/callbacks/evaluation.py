"""Evaluation while training: every ``monitor.evaluation.interval`` steps and at the end, bits per
character of held-out text and log-likelihood accuracy of evaluation tasks, on the model being
trained, every rank scoring a share.

The prompts, choices and text windows are made once, when the run starts, by the same code
``kinoe eval`` uses (``eval.bpc.prepare_windows``, ``eval.loglik.build_requests``, the task
registry), so the figures are the ones a converted checkpoint would get from ``kinoe eval``
with the same tokenizer, shots and examples — without converting. Each row (a text window, or a
prompt with one choice) is one sequence through the model, right-padded in a micro-batch; under
ZeRO-3 every rank runs as many forwards (empty shares run a one-token row) because each forward
gathers the parameters. The per-row log-likelihoods are summed over ranks, so every rank holds
all of them. Figures go to the console and W&B (``eval/bpc``, ``eval/<task>/acc``,
``eval/<task>/acc_norm``, ``eval/seconds``) and to ``evaluation.jsonl`` in the run directory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from common.errors import KinoeError
from training.callbacks.periodic import PeriodicEvaluation, shared_forward_count
from training.config import EvaluationConfig
from training.world import World

EVALUATION_FILE = "evaluation.jsonl"


class Rows:
    """Token rows to score, each ``(ids, first)``: the log-likelihood of ``ids[first:]`` after the rest."""

    def __init__(self) -> None:
        self.rows: list[tuple[list[int], int]] = []
        self.bpc: tuple[int, int, int] | None = None  # (first row, end row, characters)
        # task -> (first row, [(choices, gold index, characters of each choice)])
        self.tasks: dict[str, tuple[int, list[tuple[int, int, list[int]]]]] = {}


def prepare_rows(config: EvaluationConfig, max_length: int) -> Rows:
    """Tokenize the held-out text and the tasks' prompts and choices with the run's tokenizer."""
    from transformers import AutoTokenizer

    from eval.bpc import prepare_windows, read_texts
    from eval.data import load_task, task_source
    from eval.loglik import build_requests
    from eval.model import LoadedModel
    from eval.tasks import REGISTRY
    from eval.tasks.base import few_shot_header, prompt

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    except (OSError, ValueError) as error:
        raise KinoeError(
            f"monitor.evaluation.tokenizer {config.tokenizer}: not a Hugging Face tokenizer "
            f"directory ({str(error).splitlines()[0]}); point it at `kinoe tokenizer`'s export/hf"
        ) from None
    if tokenizer.bos_token_id is None:
        raise KinoeError(
            f"monitor.evaluation.tokenizer {config.tokenizer} has no BOS token; use the "
            "tokenizer the model trains with (`kinoe tokenizer`'s export/hf)"
        )
    # Only the tokenizer and the length are used: the scoring here runs the training model.
    loaded = LoadedModel(None, tokenizer, torch.device("cpu"), max_length, None, {})
    rows = Rows()
    if config.bpc_texts:
        texts, _ = read_texts(config.bpc_texts, config.bpc_max_documents)
        windows = prepare_windows(loaded, texts, None)
        rows.rows += windows.rows
        rows.bpc = (0, len(rows.rows), windows.characters)
    for name in config.tasks:
        task = REGISTRY[name]
        source = task_source(task, config.data_dir, config.jglue_dir)
        data = load_task(task, "loglik", source, "test", config.shots, config.seed)
        header = few_shot_header(task.prompt_format("loglik").instruction, data.shots)
        start, questions = len(rows.rows), []
        examples = data.examples[: config.limit]
        requests = build_requests(
            loaded, [prompt(header, s) for s in examples], [s.choices for s in examples]
        )
        for sample, request in zip(examples, requests, strict=True):
            rows.rows += [
                (request.context + continuation, len(request.context))
                for continuation in request.continuations
            ]
            questions.append(
                (
                    len(sample.choices),
                    sample.choices.index(sample.output),
                    [len(c) for c in sample.choices],
                )
            )
        rows.tasks[name] = (start, questions)
    return rows


@torch.no_grad()
def row_logliks(model: nn.Module, rows: list[tuple[list[int], int]], device) -> torch.Tensor:
    """Summed log-likelihood (nats) of each row's scored tokens, one right-padded forward."""
    width = max(len(ids) for ids, _ in rows)
    tokens_BT = torch.zeros((len(rows), width), dtype=torch.long)
    for index, (ids, _) in enumerate(rows):
        tokens_BT[index, : len(ids)] = torch.tensor(ids)
    # Causal attention: a row's real tokens never see the padding after them.
    logits_BTV = model(tokens_BT.to(device))
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
    for index, (ids, first) in enumerate(rows):
        logprobs_TV = logits_BTV[index, first - 1 : len(ids) - 1].float().log_softmax(-1)
        targets_T = tokens_BT[index, first : len(ids)].to(device)
        sums[index] = logprobs_TV.gather(-1, targets_T[:, None]).sum()
    return sums


class TrainingEvaluation(PeriodicEvaluation):
    """Scores ``Rows`` on the training model every ``interval`` steps and at ``total_steps``."""

    title = "evaluation"

    def __init__(
        self,
        config: EvaluationConfig,
        world: World,
        max_length: int,
        total_steps: int,
        run_dir: Path,
    ):
        super().__init__(world, config.interval, total_steps, Path(run_dir) / EVALUATION_FILE)
        self.config = config
        self.rows = prepare_rows(config, max_length)

    def evaluate(self, step: int, model: nn.Module | None) -> dict[str, float]:
        """Every rank scores its share of the rows; the figures, the same on every rank."""
        started = time.perf_counter()
        world, rows = self.world, self.rows.rows
        mine = sorted(range(world.rank, len(rows), world.size), key=lambda i: len(rows[i][0]))
        size = self.config.micro_batch_size
        chunks = [mine[i : i + size] for i in range(0, len(mine), size)]
        sums = torch.zeros(len(rows), dtype=torch.float64, device=world.device)
        was_training = model.training
        model.eval()
        for index in range(shared_forward_count(len(chunks), world)):
            if index < len(chunks):
                sums[chunks[index]] = row_logliks(
                    model, [rows[i] for i in chunks[index]], world.device
                )
            else:  # a one-token row: this rank's share is done, the others' is not
                row_logliks(model, [([rows[0][0][0], rows[0][0][0]], 1)], world.device)
        model.train(was_training)
        dist.all_reduce(sums)
        values = self.figures(sums.cpu().tolist())
        values["eval/seconds"] = time.perf_counter() - started
        return values

    def figures(self, logliks: list[float]) -> dict[str, float]:
        """Bits per character, and accuracy (raw and per character) of each task."""
        values: dict[str, float] = {}
        if self.rows.bpc is not None:
            first, end, characters = self.rows.bpc
            values["eval/bpc"] = -sum(logliks[first:end]) / math.log(2) / max(characters, 1)
        for name, (start, questions) in self.rows.tasks.items():
            correct = correct_norm = 0
            for choices, gold, lengths in questions:
                scores = logliks[start : start + choices]
                start += choices
                best = max(range(choices), key=lambda i: (scores[i], -i))
                normed = [s / max(n, 1) for s, n in zip(scores, lengths, strict=True)]
                best_norm = max(range(choices), key=lambda i: (normed[i], -i))
                correct += best == gold
                correct_norm += best_norm == gold
            values[f"eval/{name}/acc"] = correct / max(len(questions), 1)
            values[f"eval/{name}/acc_norm"] = correct_norm / max(len(questions), 1)
        return values
