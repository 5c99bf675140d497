"""Two nodes: run_multi_no_trainer.sh started twice on this machine as nodes 0 and 1 of a
two-node job (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; one CPU process each, gloo), then
started twice again to resume. The real launchers meet at the rendezvous, train in sync and
checkpoint both ranks' data positions."""
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT

TIMEOUT = 300  # seconds per pair of launchers; a rendezvous that never completes must not hang the suite


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(extra_args, log_root, port):
    """Both nodes' launchers, each in its own process group (so a hang is killed whole)."""
    env = dict(os.environ, PYTHONPATH=ROOT, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC_PER_NODE="1")
    nodes = []
    for rank in (0, 1):
        node_env = dict(env, NODE_RANK=str(rank), LOG_DIR=str(log_root / f"node{rank}"))
        nodes.append(subprocess.Popen(["bash", "run_multi_no_trainer.sh", *extra_args], cwd=ROOT, env=node_env, start_new_session=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return nodes


def run_nodes(extra_args, log_root):
    nodes = start_nodes(extra_args, log_root, free_port())
    try:
        outputs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    logs = [read(log_root / f"node{rank}" / "workerlog.0") for rank in (0, 1)]
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"node {rank} exited {node.returncode}:\n{outputs[rank][-2000:]}\n{logs[rank][-3000:]}"
    return logs


def read(path):
    return open(path).read() if os.path.isfile(path) else f"(no {path})"


def checksum(log):
    return re.findall(r"rank (\d): parameter checksum (\S+)", log)[-1]


@pytest.fixture
def run_args(stock_pipeline_dir, shapes, tmp_path):
    """The seed's command (run_single_no_trainer.sh) made tiny: it continues a model directory
    (the seed's CompVis one is not local), 16 px, batch 2, no image logging."""
    return ["--pretrained_model_name_or_path", str(stock_pipeline_dir), "--output_dir", str(tmp_path / "out"),
            "--file_list", shapes["file_list"], "--resolution", "16", "--model_max_length", "16", "--train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--num_workers", "0", "--num_threads", "1", "--logging_steps", "1",
            "--save_steps", "2", "--image_logging_steps", "0", "--learning_rate", "1e-3"]


def test_two_nodes_train_in_sync_and_resume(run_args, tmp_path):
    out = tmp_path / "out"
    logs = run_nodes(run_args + ["--max_train_steps", "2"], tmp_path / "logs1")
    # One job of two ranks, node 0's process rank 0 and node 1's rank 1, in sync.
    assert "world 2" in logs[0] and "this rank reads shards 0..0" in logs[0] and "this rank reads shards 1..1" in logs[1]
    (r0, a), (r1, b) = checksum(logs[0]), checksum(logs[1])
    assert (r0, r1) == ("0", "1") and a == b
    positions = [json.load(open(out / "checkpoint-2" / f"data_position_rank{r}.json")) for r in (0, 1)]
    assert all(p["world_size"] == 2 and p["batches"] == 2 for p in positions), positions

    # The same two commands again, two steps more: both ranks resume from checkpoint-2.
    logs = run_nodes(run_args + ["--max_train_steps", "4"], tmp_path / "logs2")
    assert all("Resuming from" in log and "checkpoint-2" in log for log in logs)
    positions = [json.load(open(out / "checkpoint-4" / f"data_position_rank{r}.json")) for r in (0, 1)]
    assert all(p["batches"] == 4 for p in positions), positions  # two batches after the two before
    assert checksum(logs[0])[1] == checksum(logs[1])[1]
    assert (out / "model_index.json").is_file()


def test_several_nodes_need_their_rank_and_the_master(run_args, tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], NNODES="2", NPROC_PER_NODE="1")
    env.pop("NODE_RANK", None)
    env.pop("MASTER_ADDR", None)
    res = subprocess.run(["bash", "run_multi_no_trainer.sh", *run_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: NNODES=2 needs NODE_RANK")
    res = subprocess.run(["bash", "run_multi_no_trainer.sh", *run_args], cwd=ROOT, env=dict(env, NODE_RANK="2", MASTER_ADDR="127.0.0.1"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "NODE_RANK=2 must be a node index from 0 to NNODES-1" in res.stderr.strip().splitlines()[-1]
