#!/usr/bin/env bash
# The seed's multi-GPU command: run_single_no_trainer.sh under paddle.distributed.launch (through ldm.launch).
# ldm.launch is paddle.distributed.launch (same flags) that passes SIGTERM on to the ranks, which save
# and exit 0, instead of SIGKILLing them after 30 s and exiting 15 (ldm/launch.py).
# GPUS=0,1 picks the devices; extra arguments are appended (and win), e.g.
#   GPUS=0,1 bash run_multi_no_trainer.sh --max_train_steps 100 --resolution 64
# On a CPU-only machine: LAUNCHER="python -u -m ldm.launch --nproc_per_node 2" bash run_single_no_trainer.sh ...
LAUNCHER="python -u -m ldm.launch --gpus ${GPUS:-0,1,2,3,4,5,6,7}" exec bash "$(dirname "$0")/run_single_no_trainer.sh" "$@"
