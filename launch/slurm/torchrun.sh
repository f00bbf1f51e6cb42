#!/usr/bin/env bash
# One node's part of a training run: a torchrun agent that starts this node's trainer processes
# and meets the other nodes' agents through a c10d rendezvous on the first node.
#
#   launch/slurm/torchrun.sh COMMAND CONFIG [key=value ...]
#
# train.sbatch runs it once per node (srun, one task per node), after activating the
# environment; it works without SLURM as well, e.g. two machines by hand:
#
#   KINOE_NNODES=2 KINOE_RDZV_ENDPOINT=host0:29400 launch/slurm/torchrun.sh pretrain configs/pretrain/x.yaml
#
# on host0 and on host1 (tests/test_multinode.py runs two on one machine), or on one machine:
#
#   KINOE_NPROC_PER_NODE=8 launch/slurm/torchrun.sh pretrain configs/pretrain/x.yaml
#
# Exit code: torchrun's, except 75 when the run stopped at a checkpoint (see the end). Settings:
#
#   KINOE_NNODES            nodes taking part (default 1)
#   KINOE_NPROC_PER_NODE    trainer processes here (default: this node's GPUs in the SLURM job,
#                           $SLURM_GPUS_ON_NODE, else 1: one CPU process)
#   KINOE_RDZV_ENDPOINT     host:port of the rendezvous, a port free on the first node; its agent
#                           hosts the rendezvous store. Unset: torchrun --standalone on one node
#                           (a free port of its own), localhost:29400 on several
#   KINOE_RDZV_ID           the same on every node of one run (default kinoe)
#   KINOE_TORCHRUN_LOG_DIR  per-rank stdout/stderr files go under DIR/<node>/ as well as to
#                           the console (default: console only)
set -euo pipefail

if (($# < 2)); then
    echo "usage: $0 COMMAND CONFIG [key=value ...]   (COMMAND: pretrain, 'finetune sft', ...)" >&2
    exit 2
fi
read -r -a command <<<"$1" # "finetune sft" is two words
config="$2"
shift 2

# Already active under train.sbatch (the step inherits the batch script's environment); this
# makes a run by hand the same.
# shellcheck source=launch/slurm/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" || exit 1

nnodes="${KINOE_NNODES:-1}"
nproc="${KINOE_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
((nproc > 0)) || nproc=1

# CPU threads per trainer: the CPUs this task may use (nproc honours SLURM's binding and the
# cgroup) shared by the trainers on this node. Left unset, every trainer would start one
# OpenMP thread per core and 8 trainers would fight over each core; torchrun's own fallback is
# 1, which starves CPU-side work (the optimizer step under ZeRO offload, data loading). The
# DataLoader workers (data.num_workers per trainer) need cores too: ask SLURM for at least
# trainers x (threads + workers) CPUs per node (SlurmJob.cpus_per_task).
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    threads=$(($(nproc) / nproc))
    export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi

# Signals. SLURM delivers SIGUSR1 (train.sbatch forwards its time-limit warning) and SIGTERM
# (preemption, scancel, the time limit itself) to every process of the job step: this agent,
# the trainers and their DataLoader workers. The trainers handle both: every rank agrees on a
# step, saves a checkpoint and exits with 75 (pretrain/trainer.py). The agent must neither die
# nor interfere while they do:
# - SIGUSR1 would kill torchrun (it has no handler for it). The step then ends with its task
#   (this agent): srun returns while the orphaned trainers are still writing their checkpoint,
#   train.sbatch decides on a half-written run, and SLURM kills what is left of the step.
# - On SIGTERM torchrun itself signals its workers and SIGKILLs them 30 s later, sooner than a
#   large checkpoint is written and sooner than the cluster's grace time (KillWait, GraceTime).
# So the agent ignores both (an ignored signal stays ignored in the processes started from here)
# and torchrun is told not to install its SIGTERM handler (--signals-to-handle below). It then
# only sees its trainers exit (75) and exits itself. The trainers inherit "ignored" too and install their own handlers
# when training starts; a signal that arrives earlier, while they load, is lost (the job then
# runs on to its time limit). SIGINT (Ctrl-C by hand) still stops everything.
trap '' USR1 TERM

logging=()
if [[ -n "${KINOE_TORCHRUN_LOG_DIR:-}" ]]; then
    # torchrun writes <dir>/<rdzv id>_<random>/attempt_0/<local rank>/{stdout,stderr}.log.
    logging=(--log-dir "$KINOE_TORCHRUN_LOG_DIR/${SLURMD_NODENAME:-$(hostname -s)}" --tee 3)
fi

if ((nnodes == 1)) && [[ -z "${KINOE_RDZV_ENDPOINT:-}" ]]; then
    # By hand on one machine: a free port, so two runs on one machine do not collide.
    rendezvous=(--standalone)
    where="standalone"
else
    rendezvous=(--rdzv-backend=c10d --rdzv-endpoint="${KINOE_RDZV_ENDPOINT:-localhost:29400}"
        --rdzv-id="${KINOE_RDZV_ID:-kinoe}")
    where="${KINOE_RDZV_ENDPOINT:-localhost:29400} id ${KINOE_RDZV_ID:-kinoe}"
fi

echo "kinoe torchrun: node $(hostname -s), $nproc trainer(s) of $nnodes node(s)," \
    "rendezvous $where, OMP_NUM_THREADS=$OMP_NUM_THREADS"
# Trainers that saved a checkpoint on a signal exit 75 (EX_TEMPFAIL: stopped, resumable), but
# torchrun reports any non-zero exit of a trainer as its own failure, exit 1 (ChildFailedError),
# and cannot pass a code through. So each trainer leaves its exit code in this folder (kinoe's
# CLI writes it, launch/cli.py), and when every trainer of this node exited 75 the node exits 75
# too: srun, SLURM's accounting and a user running this by hand all see "stopped, run the same
# command again" rather than a failure. Node-local on purpose: a node need not wait for rank 0,
# elsewhere, to record the run's end in the manifest (train.sbatch decides on the manifest).
exit_codes="$(mktemp -d "${TMPDIR:-/tmp}/kinoe-exit-codes.XXXXXX")"
trap 'rm -rf "$exit_codes"' EXIT
export KINOE_EXIT_CODE_DIR="$exit_codes"

# --max-restarts=0: a failed trainer fails the job. Restarting is SLURM's part (requeue), from
# the last checkpoint, never torchrun's from a half-finished step.
code=0
"$KINOE_PYTHON" -m torch.distributed.run \
    --nnodes="$nnodes" \
    --nproc-per-node="$nproc" \
    "${rendezvous[@]}" \
    --max-restarts=0 \
    --signals-to-handle=SIGINT,SIGHUP,SIGQUIT \
    "${logging[@]}" \
    "$(command -v kinoe)" "${command[@]}" -c "$config" "$@" || code=$?

if ((code != 0)); then
    stopped=0
    for record in "$exit_codes"/rank*; do
        if [[ -f "$record" && "$(<"$record")" == 75 ]]; then
            stopped=$((stopped + 1))
        fi
    done
    if ((stopped == nproc)); then
        echo "kinoe torchrun: every trainer here stopped at a checkpoint (exit 75; torchrun" \
            "exited $code): exit 75, run the same command again to resume"
        exit 75
    fi
fi
exit "$code"
