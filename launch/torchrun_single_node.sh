#!/usr/bin/env bash
# One machine, NPROC processes: one per GPU on a GPU machine (NCCL), or NPROC CPU processes (gloo). Rank 0 is also
# the server. Clients are spread over the processes by sample count; more clients than processes is fine.
#
#   launch/torchrun_single_node.sh NPROC --config CONFIG [overrides...]
#   launch/torchrun_single_node.sh 4 --config configs/vit_domainnet.yaml --data.root /data/domainnet
#
# The run always resumes from the last checkpoint in its out_dir (--resume auto comes last), so the same command
# continues an interrupted run (start afresh with another --out_dir). MAX_RESTARTS=N (default 0) lets torchrun
# restart crashed processes, which then resume too.
# PYTHON selects the interpreter that has lorafair installed (default: python).
set -euo pipefail
nproc="${1:?usage: $0 NPROC --config CONFIG [overrides...]}"
shift
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
    --max_restarts="${MAX_RESTARTS:-0}" -m lorafair fit "$@" --resume auto
