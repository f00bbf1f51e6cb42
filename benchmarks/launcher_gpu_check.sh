#!/usr/bin/env bash
# GPU check of launch/slurm/torchrun.sh: two torchrun agents on one host, one GPU each, as two
# "nodes" meeting in a c10d rendezvous (NCCL, bf16), with the quickstart pretraining config:
# a run to completion, then a run stopped by SIGUSR1 to the trainers and resumed from its checkpoint.
# Needs the quickstart shards (make quickstart) and a machine with two GPUs:
#     bash benchmarks/launcher_gpu_check.sh
# Writes under /tmp/r; prints each run's manifest status and the resume line.
set -uo pipefail
if ! command -v kinoe >/dev/null; then
    # kinoe not installed (a bare GPU machine with PYTHONPATH=<checkout>): an entry point for it.
    mkdir -p /tmp/bin
    printf '#!/usr/bin/env python3\nimport sys\nfrom launch.cli import main\nsys.exit(main())\n' > /tmp/bin/kinoe
    chmod +x /tmp/bin/kinoe
    export PATH=/tmp/bin:$PATH
fi
agents() {  # $1 = run name, $2 = steps, $3 = rendezvous port
    for gpu in 0 1; do
        CUDA_VISIBLE_DEVICES=$gpu KINOE_NNODES=2 KINOE_NPROC_PER_NODE=1 \
        KINOE_RDZV_ENDPOINT=127.0.0.1:$3 KINOE_RDZV_ID=$1 \
        bash launch/slurm/torchrun.sh pretrain configs/pretrain/quickstart.yaml \
            run.root=/tmp/r run.name=$1 train.steps=$2 checkpoint.interval=100 monitor.log_interval=50 \
            > /tmp/agent_$1_$gpu.log 2>&1 &
    done
}
agents straight 300 29411; wait
python3 -c "import json;m=json.load(open('/tmp/r/pretrain/straight/manifest.json'));print('straight', m['status'], m['summary'].get('steps'))"
grep -h -E "ZeRO|step 300/|nccl|NCCL" /tmp/agent_straight_0.log | head -5
agents stopped 3000 29412
for i in $(seq 1 120); do
    [[ -f /tmp/r/pretrain/stopped/metrics.jsonl ]] && (( $(wc -l < /tmp/r/pretrain/stopped/metrics.jsonl) >= 200 )) && break
    sleep 0.5
done
pkill -USR1 -f "kinoe pretrain" ; wait
python3 -c "import json;m=json.load(open('/tmp/r/pretrain/stopped/manifest.json'));print('after USR1', m['status'], m.get('error'))"
tail -n 3 /tmp/agent_stopped_0.log
agents stopped 3000 29413; wait
python3 -c "import json;m=json.load(open('/tmp/r/pretrain/stopped/manifest.json'));print('resumed', m['status'], m['summary'].get('steps'))"
grep -h "resumed from" /tmp/r/pretrain/stopped/logs/*.log | head -2
