# Sourced by run_multi_trainer.sh and run_multi_no_trainer.sh: sets LAUNCHER, the
# launch command for this node (ldm.launch: paddle.distributed.launch, same flags, with SIGTERM
# passed on to the ranks; ldm/launch.py), from the environment they document.
if [ -n "${NPROC_PER_NODE:-}" ]; then
    LAUNCHER="python -u -m ldm.launch --nproc_per_node ${NPROC_PER_NODE}"
else
    LAUNCHER="python -u -m ldm.launch --gpus ${GPUS:-0,1,2,3,4,5,6,7}"
fi
if [ "${NNODES:-1}" != 1 ]; then
    if [ -z "${NODE_RANK:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then
        echo "error: NNODES=${NNODES} needs NODE_RANK (this node's index, 0 to $((NNODES - 1))) and MASTER_ADDR (node 0's address) in the environment" >&2
        exit 2
    fi
    if ! [[ "${NODE_RANK}" =~ ^[0-9]+$ && "${NNODES}" =~ ^[0-9]+$ ]] || [ "${NODE_RANK}" -ge "${NNODES}" ]; then
        # (a rank the rendezvous never fills would leave every node waiting for it)
        echo "error: NODE_RANK=${NODE_RANK} must be a node index from 0 to NNODES-1 (NNODES=${NNODES})" >&2
        exit 2
    fi
    # The launchers meet at node 0's MASTER_ADDR:MASTER_PORT (an HTTP key-value store that the
    # launcher on node 0 serves when MASTER_ADDR is one of its own IP addresses or 127.0.0.1, so
    # give an IP, not a host name) and number the nodes by --rank: node R's processes are global
    # ranks R*P .. R*P+P-1 (P per node), so a node reads the same data shards, and resumes its
    # ranks' saved data positions, on every restart. The training processes then meet at the
    # endpoint the launcher hands them (PADDLE_MASTER), not at MASTER_PORT.
    LAUNCHER="${LAUNCHER} --nnodes ${NNODES} --rank ${NODE_RANK} --master ${MASTER_ADDR}:${MASTER_PORT:-29500}"
fi
if [ -n "${LOG_DIR:-}" ]; then
    LAUNCHER="${LAUNCHER} --log_dir ${LOG_DIR}"
fi
export LAUNCHER
