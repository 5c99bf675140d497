#!/usr/bin/env bash
# The seed's multi-GPU command: run_single_no_trainer.sh under paddle.distributed.launch (through ldm.launch:
# the same flags, but SIGTERM is passed on to the ranks, which save and exit 0, instead of being
# SIGKILLed after 30 s with exit 15: ldm/launch.py), on this machine alone or as one node of several.
# Extra arguments are appended (and win), e.g.
#   GPUS=0,1 bash run_multi_no_trainer.sh --max_train_steps 100 --resolution 64
# Environment (all optional; with none set this is the seed's command on GPUs 0-7 of one machine):
#   GPUS=0,1,...       this node's devices (default 0,1,2,3,4,5,6,7)
#   NPROC_PER_NODE=P   P processes on this node instead of GPUS (a CPU-only machine: gloo)
#   NNODES=N           machines in the job (default 1); run the same command on each, with
#   NODE_RANK=R        this machine's index, 0 to N-1 (node 0 serves the rendezvous)
#   MASTER_ADDR=IP     node 0's IP address as the other nodes reach it (an address: not a host name)
#   MASTER_PORT=PORT   a free TCP port on node 0 for the rendezvous (default 29500)
#   LOG_DIR=DIR        where this node's processes log (workerlog.*; default ./log)
# Two machines of 8 GPUs, --output_dir on a filesystem both mount (every rank writes its data
# position into each checkpoint, and a re-run resumes every rank from there):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_multi_no_trainer.sh --output_dir /shared/run ...   # on 10.0.0.1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash run_multi_no_trainer.sh --output_dir /shared/run ...   # on the other
source "$(dirname "$0")/launch_nodes.sh"
exec bash "$(dirname "$0")/run_single_no_trainer.sh" "$@"
