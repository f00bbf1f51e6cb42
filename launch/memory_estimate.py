"""Memory one rank needs to train a pretrain config, from the model's shapes, before anything is built.

``kinoe preflight`` refuses to build a config whose estimate exceeds the memory it has, so a
7B model never gets the chance to exhaust a 24 GB machine. The refusal must not be wrong, so
this is a floor, not a forecast: it counts what training cannot avoid holding and leaves out
what depends on kernels and allocators (attention score matrices of a math-path SDPA,
autograd temporaries, fragmentation). A config whose floor fits is then built and measured.

Per rank, with N parameters (every expert counted), W ranks, p bytes per value (2 for bf16,
4 for fp32) and ZeRO stage Z:

- weights ``p N`` (divided by W at ZeRO-3); this rank's gradient partition ``p N / W``;
  fp32 master weights ``4 N / W`` and AdamW's two fp32 moments ``8 N / W``; with bf16 also the
  fp32 copy of this rank's gradient partition that the optimizer step reads, ``4 N / W``
  (ZeRO-3: one ``sub_group_size`` at a time), which exists only after the backward pass has
  freed the activations, so the peak counts the larger of the two;
- DeepSpeed's gradient buckets: ``reduce_bucket_size`` values (ZeRO-1/2: twice with
  ``overlap_comm``), allocated whole on a GPU; on CPU only the pages written count, at most N
  values. ZeRO-3 also gathers whole modules: at least the larger of one block and the
  embedding;
- activations saved for the backward pass (below), for one micro-batch of B x T tokens;
- the runtime already resident before building (CUDA context, or the process on CPU),
  measured by the caller.

Expert parallelism (``engine.expert_parallel`` = E_p, ZeRO-1/2 only) splits the routed experts'
``N_x`` parameters over E_p ranks: a rank holds the dense ``N - N_x`` and ``N_x / E_p`` expert
weights, and the expert part's optimizer state is partitioned over the ``W / E_p`` ranks
that hold the same experts (training/expert_optimizer.py, ZeRO-1 style), so it stays
``N_x / W`` per rank while the weights shrink by E_p; the expert gradients are accumulated
whole (``N_x / E_p`` values in the training dtype) and reduce-scattered at the step. Activations are counted as without EP:
with balanced routing a rank's experts see as many token assignments as all experts would
(the all-to-all's receive buffers are among the temporaries left out).

Activations per token, per layer, as the autograd graph keeps them (D hidden, H query and G
key/value heads of K dims, F MLP width): each RMSNorm keeps its fp32 input and its output
(``4D + pD``, twice); attention keeps three copies each of q and k (as projected, their
rotated halves, and with RoPE applied), v, the output and its reshaped copy
(``(5H + 4G) K p``, plus the fp32 log-sum-exp); SwiGLU
keeps gate, up, silu(gate) and their product (``4 F p``; Mixtral: ``top_k`` times that plus the
gathered inputs and outputs). With activation checkpointing only each block's input is kept
(``p D`` per layer) plus one block recomputed during the backward pass. The output layer keeps
``V`` logits and the loss an fp32 copy of them (``V (p + 4)``). With ``engine.compile`` the
fused blocks and loss keep only the inputs of matmuls and attention and recompute the
elementwise work: ``4 p D`` for the norms, ``(3H + 2G) K p`` for attention, ``2 F p`` for
SwiGLU, ``V p`` for the logits. SDPA with a document mask or a sliding window builds a dense
boolean (B, T, T) mask once per forward.

Checked against ``torch.cuda.max_memory_allocated`` on H200s by ``kinoe preflight`` itself,
the estimate without the CUDA context below the measurement every time: mistral_1b, 4 x 4,096
tokens, ZeRO-2, one GPU, 52.5 against 55.0 GiB eager and 36.5 against 39.4 compiled;
mixtral_1b_active likewise 90.0 against 93.5 and 74.0 against 77.4; ZeRO-3 on two GPUs,
mistral_7b 1 x 4,096 compiled with activation checkpointing, 61.1 against 62.9
(docs/preflight.md has every row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from pretrain.config import PretrainConfig

GiB = 2**30
# AdamW state per parameter in fp32: master weights, first and second moments.
MASTER_BYTES = 4
MOMENT_BYTES = 8


def bytes_per_value(precision: str) -> int:
    """2 for bf16, 4 for fp32."""
    return 2 if precision == "bf16" else 4


@dataclass(frozen=True)
class MemoryEstimate:
    """The floor of one rank's memory, by what holds it (bytes)."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        # The fp32 gradient copy exists only during the optimizer step, after the backward
        # pass has freed the activations: the peak holds one of the two.
        transient = (self.parts.get("activations", 0), self.parts.get("optimizer_step", 0))
        return sum(self.parts.values()) - min(transient)

    @property
    def activations(self) -> int:
        return self.parts.get("activations", 0)

    def summary(self) -> dict[str, Any]:
        """The JSON form for reports."""
        return {"parts_bytes": dict(self.parts), "total_bytes": self.total}

    def describe(self) -> str:
        """``weights 14.5, gradients 14.5, ... GiB`` for one-line reasons."""
        shown = ", ".join(
            f"{name} {value / GiB:,.1f}"
            for name, value in self.parts.items()
            if value >= 0.05 * GiB
        )
        return f"{shown} GiB"


def _block_parameters(args: Any) -> int:
    return (args.num_parameters(include_embeddings=False) - args.hidden_size) // args.num_layers


def expert_parameters(args: Any) -> int:
    """Parameters of the routed experts, every layer's; 0 for a dense model."""
    count = getattr(args, "num_expert_parameters", None)
    return count() if count else 0


def expert_parallel_size(config: PretrainConfig) -> int:
    """``engine.expert_parallel`` (1 until the engine has that setting)."""
    return int(getattr(config.engine, "expert_parallel", 1))


def _bucket_values(
    ds_config: dict[str, Any], zero_stage: int, parameters: int, on_gpu: bool
) -> int:
    zero = ds_config.get("zero_optimization", {})
    bucket = int(float(zero.get("reduce_bucket_size", 5e8)))
    # ZeRO-1/2 double-buffer with overlap_comm; ZeRO-3 keeps one bucket.
    buffers = 2 if zero_stage < 3 and zero.get("overlap_comm", False) else 1
    # torch.empty on the host maps pages lazily: only the gradients copied in make them resident.
    return bucket * buffers if on_gpu else min(bucket * buffers, parameters)


def model_state_bytes(
    args: Any,
    precision: str,
    zero_stage: int,
    world_size: int,
    ds_config: dict[str, Any],
    on_gpu: bool,
    expert_parallel: int = 1,
    accumulation: int = 1,
) -> dict[str, int]:
    """Weights, gradients, optimizer state and DeepSpeed's buffers on one rank (bytes).

    ``accumulation``: micro-batches per step on each rank."""
    n = args.num_parameters()
    p = bytes_per_value(precision)
    w = world_size
    experts = expert_parameters(args) if expert_parallel > 1 else 0
    held = n - experts + experts // expert_parallel  # the weights this rank holds
    # Dense parameters are partitioned over all W ranks, this rank's experts over the
    # W / E_p ranks that hold the same experts.
    partition = (n - experts) // w + experts // expert_parallel // max(w // expert_parallel, 1)
    parts = {
        "weights": p * n // w if zero_stage == 3 else p * held,
        # Expert gradients are accumulated whole, then reduce-scattered over their holders.
        "gradients": p * (partition + (experts // expert_parallel if experts else 0)),
        "optimizer": (MASTER_BYTES + MOMENT_BYTES) * partition,
    }
    if zero_stage == 1 and accumulation > 1:
        # ZeRO-1 reduces only at a step's last micro-batch: until then DeepSpeed's hooks leave
        # every gradient whole in param.grad, where the micro-batches accumulate.
        parts["gradients"] += p * (n - experts)
    if p != 4:
        # The fp32 copy of the gradient partition the step reads: all of it at once for
        # ZeRO-1/2, one sub-group at a time for ZeRO-3.
        step_values = partition
        if zero_stage == 3:
            sub_group = int(
                float(ds_config.get("zero_optimization", {}).get("sub_group_size", 1e9))
            )
            step_values = min(sub_group, step_values)
        parts["optimizer_step"] = 4 * step_values
    buffers = p * _bucket_values(ds_config, zero_stage, held, on_gpu)
    if zero_stage == 3:
        largest_module = max(_block_parameters(args), args.vocab_size * args.hidden_size)
        buffers += p * largest_module
    parts["buffers"] = buffers
    return parts


def activation_bytes(
    args: Any,
    precision: str,
    micro_batch_size: int,
    seq_len: int,
    activation_checkpointing: bool,
    dense_mask: bool,
    compiled: bool = False,
) -> int:
    """Activations one micro-batch of ``micro_batch_size`` x ``seq_len`` tokens keeps for backward."""
    p = bytes_per_value(precision)
    d, k, h, g = args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads
    f = args.intermediate_size
    top_k = getattr(args, "top_k", None)
    if compiled:
        # Fused blocks keep the inputs of each matmul and recompute the elementwise work.
        norms = 2 * 2 * p * d
        attention = (3 * h + 2 * g) * k * p + 4 * h
        mlp = 2 * f * p
        output = 2 * p * d + args.vocab_size * p
    else:
        norms = 2 * (4 * d + p * d)
        attention = (5 * h + 4 * g) * k * p + 4 * h
        mlp = 4 * f * p
        output = (4 * d + p * d) + args.vocab_size * (p + 4)
    feed_forward = mlp if top_k is None else top_k * (mlp + 2 * d * p) + 4 * d
    per_layer = norms + attention + feed_forward
    if activation_checkpointing:
        layers = args.num_layers * p * d + per_layer
    else:
        layers = args.num_layers * per_layer
    tokens = micro_batch_size * seq_len
    mask = micro_batch_size * seq_len * seq_len if dense_mask else 0
    return tokens * (layers + output) + mask


def needs_dense_mask(args: Any, document_masking: bool) -> bool:
    """Whether attention builds a dense (B, T, T) mask: SDPA with documents or a sliding window."""
    return args.attention == "sdpa" and (document_masking or args.sliding_window is not None)


def estimate_memory(
    config: PretrainConfig,
    precision: str,
    world_size: int,
    ds_config: dict[str, Any],
    on_gpu: bool,
    runtime_bytes: int = 0,
    *,
    zero_stage: int | None = None,
    micro_batch_size: int | None = None,
    activation_checkpointing: bool | None = None,
) -> MemoryEstimate:
    """The floor of one rank's memory for ``config`` on ``world_size`` ranks.

    The keyword arguments replace the config's values, to ask what a change would need.
    """
    args = config.model.build_args()
    stage = config.engine.zero_stage if zero_stage is None else zero_stage
    micro = config.train.micro_batch_size if micro_batch_size is None else micro_batch_size
    checkpointing = (
        config.engine.activation_checkpointing
        if activation_checkpointing is None
        else activation_checkpointing
    )
    parts = model_state_bytes(
        args,
        precision,
        stage,
        world_size,
        ds_config,
        on_gpu,
        expert_parallel_size(config),
        accumulation=config.train.global_batch_size // (micro * world_size),
    )
    parts["activations"] = activation_bytes(
        args,
        precision,
        micro,
        config.data.seq_len,
        checkpointing,
        needs_dense_mask(args, config.data.document_masking),
        compiled=config.engine.compile,
    )
    parts["runtime"] = runtime_bytes
    return MemoryEstimate(parts)


def memory_fixes(
    config: PretrainConfig,
    precision: str,
    world_size: int,
    ds_config: dict[str, Any],
    on_gpu: bool,
    runtime_bytes: int,
    capacity_bytes: int,
) -> str:
    """The config changes whose estimate fits ``capacity_bytes``, as one clause for a reason line."""
    current = {
        "zero_stage": config.engine.zero_stage,
        "micro_batch_size": config.train.micro_batch_size,
        "activation_checkpointing": config.engine.activation_checkpointing,
    }
    names = {
        "zero_stage": "engine.zero_stage",
        "micro_batch_size": "train.micro_batch_size",
        "activation_checkpointing": "engine.activation_checkpointing",
    }
    candidates = [
        {"activation_checkpointing": True},
        {"micro_batch_size": 1},
        {"zero_stage": 3},
        {"activation_checkpointing": True, "micro_batch_size": 1},
        {"zero_stage": 3, "activation_checkpointing": True},
        {"zero_stage": 3, "activation_checkpointing": True, "micro_batch_size": 1},
    ]
    expert_parallel = expert_parallel_size(config)
    fitting = []
    for change in candidates:
        if all(current[key] == value for key, value in change.items()):
            continue
        if expert_parallel > 1 and change.get("zero_stage") == 3:
            continue  # expert parallelism composes with ZeRO-1 and 2 only
        if any(fits <= change.items() for fits in fitting):
            continue  # a smaller change already fits
        estimate = estimate_memory(
            config, precision, world_size, ds_config, on_gpu, runtime_bytes, **change
        )
        if estimate.total <= capacity_bytes:
            fitting.append(change.items())
    if fitting:
        options = [
            " and ".join(
                f"{names[key]}={str(value).lower()}" for key, value in sorted(dict(items).items())
            )
            for items in fitting
        ]
        return "estimated to fit with " + "; or ".join(options)
    if expert_parallel > 1:
        # The dense weights stay whole on every rank at ZeRO-1/2: more ranks cannot fix them.
        experts = config.model.build_args().num_experts
        raise_it = (
            f"raise engine.expert_parallel (up to {experts} experts), or "
            if expert_parallel < experts
            else ""
        )
        return (
            f"with engine.expert_parallel={expert_parallel} (ZeRO-1/2) no change of micro-batch "
            f"or activation checkpointing fits: {raise_it}set engine.expert_parallel=1 and "
            "engine.zero_stage=3, or use GPUs with more memory"
        )
    ranks = ranks_needed(config, precision, ds_config, on_gpu, runtime_bytes, capacity_bytes)
    if ranks is None:
        fixed = estimate_memory(
            config,
            precision,
            2**40,
            ds_config,
            on_gpu,
            runtime_bytes,
            zero_stage=3,
            activation_checkpointing=True,
            micro_batch_size=1,
        )
        return (
            f"even at ZeRO-3 on any number of GPUs what does not shrink ({fixed.describe()}) "
            "does not fit: lower data.seq_len or zero_optimization.reduce_bucket_size (through "
            "engine.deepspeed), or use devices with more memory"
        )
    return (
        "set engine.zero_stage=3, engine.activation_checkpointing=true and "
        f"train.micro_batch_size=1, and train on at least {ranks} GPUs (run preflight on them)"
    )


def ranks_needed(
    config: PretrainConfig,
    precision: str,
    ds_config: dict[str, Any],
    on_gpu: bool,
    runtime_bytes: int,
    capacity_bytes: int,
) -> int | None:
    """Fewest ranks on which ZeRO-3 with activation checkpointing and micro-batch 1 fits; None: none."""
    settings = {"zero_stage": 3, "activation_checkpointing": True, "micro_batch_size": 1}

    def total(ranks: int) -> int:
        return estimate_memory(
            config, precision, ranks, ds_config, on_gpu, runtime_bytes, **settings
        ).total

    # What does not shrink with more ranks must fit on its own.
    huge = 2**40
    if total(huge) > capacity_bytes:
        return None
    shared = total(1) - total(huge)  # the part divided among ranks, on one rank
    room = capacity_bytes - total(huge)
    ranks = max(1, math.ceil(shared / room)) if room > 0 else None
    while ranks is not None and total(ranks) > capacity_bytes:
        ranks += 1
    return ranks


def checkpoint_bytes(args: Any, precision: str) -> int:
    """Bytes of one DeepSpeed checkpoint, all ranks together: weights in ``precision`` plus fp32
    master weights and two AdamW moments (ZeRO shards them into files; the sum is the same)."""
    return (bytes_per_value(precision) + MASTER_BYTES + MOMENT_BYTES) * args.num_parameters()


def host_build_bytes(config: PretrainConfig, precision: str) -> int:
    """Host memory one rank holds while building the model.

    ZeRO 1/2: the model is built whole on the host in fp32 and DeepSpeed casts it (the bf16
    copy) before moving it to the GPU, so every rank of a node holds all of it at once.
    ZeRO-3: the model is built straight into GPU partitions (``training.partitioned``); the
    host holds only the one parameter being drawn in fp32 (rank 0), the largest at most.
    With expert parallelism a rank builds only its own experts.
    """
    args = config.model.build_args()
    if config.engine.zero_stage == 3:
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = config.model.model_family.model_type(args)
        return 4 * max(parameter.numel() for parameter in model.parameters())
    ep = expert_parallel_size(config)
    experts = expert_parameters(args) if ep > 1 else 0
    n = args.num_parameters() - experts + experts // ep
    return 4 * n + (2 * n if precision == "bf16" else 0)
