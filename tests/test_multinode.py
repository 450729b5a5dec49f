"""Many nodes, on one machine: two "nodes" of one process each, started as two separate ``torchrun``s that
meet through the c10d rendezvous (``--nnodes 2 --rdzv-backend c10d``), each in its own working directory
with its own TMPDIR (what is node-local), sharing one output directory (what must be on shared storage:
checkpoints, the data cache, the logs).

- the two-node run trains exactly like a one-node DP=2 run (same losses, bit-identical weights), and
  its data preparation happens once, under the cache's file lock, when both nodes start at once;
- a node that dies mid-run (every process of it SIGKILLed) stops the other within a bound, with one
  line saying what happened and how to go on; the rerun resumes from the last checkpoint;
- the Slurm example's ``torchrun`` line is what torchrun parses, rendezvous from Slurm's variables.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import REPO, free_port

from bridge_sft.tiny import SAMPLE_DIALOGS

ITERATION_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.]+E[+-]\d+)")
# A node that dies is noticed at once when its processes' sockets close (this test: the machine lives on)
# and after dist.distributed_timeout_minutes when they fall silent (a machine or network gone): bound for the
# first case, with room for a loaded 2-core machine.
SURVIVOR_BOUND_S = 120


def _env(node_dir: Path) -> dict[str, str]:
    tmp = node_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)}


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the rendezvous store of the first node listens (so that this node hosts it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the first node exited before its rendezvous store started"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"no rendezvous store on port {port} after {timeout} s")


class Nodes:
    """Two nodes of one process each, as two ``torchrun --nnodes 2 --rdzv-backend c10d`` in their own
    working directories (``root/node0``, ``root/node1``); node 0 starts first and hosts the rendezvous."""

    def __init__(self, root: Path, args: list[str], run_id: str):
        self.port, self.procs, self.consoles = free_port(), [], []
        for node in (0, 1):
            node_dir = root / f"node{node}"
            node_dir.mkdir(parents=True, exist_ok=True)
            console = open(node_dir / f"console-{run_id}.txt", "w")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{self.port}", "--rdzv-id", run_id,
                   "-m", "bridge_sft.cli", "train", "tiny", *args]
            self.procs.append(subprocess.Popen(cmd, cwd=node_dir, env=_env(node_dir), stdout=console,
                                               stderr=subprocess.STDOUT, start_new_session=True))
            self.consoles.append(node_dir / f"console-{run_id}.txt")
            if node == 0:
                _wait_for_port(self.port, self.procs[0])

    def wait(self, timeout: float = 900) -> list[int]:
        return [proc.wait(timeout=timeout) for proc in self.procs]

    def console(self, node: int) -> str:
        return self.consoles[node].read_text()

    def kill_node(self, node: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process of ``node``: its torchrun and the ranks it started (torchrun starts
        them in sessions of their own, so killing torchrun alone leaves them running)."""
        import psutil

        agent = psutil.Process(self.procs[node].pid)
        for proc in [agent, *agent.children(recursive=True)]:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def wait_for_checkpoint(self, marker: Path, iteration: int, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not (marker.is_file() and int(marker.read_text()) >= iteration):
            assert all(p.poll() is None for p in self.procs), self.console(0)[-3000:] + self.console(1)[-3000:]
            assert time.monotonic() < deadline, f"no checkpoint at iteration {iteration}"
            time.sleep(0.2)

    def survivor_exit(self, node: int, bound: float) -> tuple[int, float]:
        """Node ``node``'s exit code and seconds until it exited (fails the test past ``bound`` seconds)."""
        start = time.monotonic()
        try:
            code = self.procs[node].wait(timeout=bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node {node} still running {bound} s after the other node was lost:\n"
                        f"{self.console(node)[-3000:]}")
        return code, time.monotonic() - start

    def close(self) -> None:
        for node in (0, 1):
            if self.procs[node].poll() is None:
                self.kill_node(node, signal.SIGCONT)
                self.kill_node(node)
                self.procs[node].wait()


def _losses(log: Path) -> dict[int, str]:
    """``{iteration: lm loss}`` as Bridge prints it (7 significant digits) in a rank's log."""
    return {int(i): v for i, v in ITERATION_LOSS.findall(log.read_text())}


def _weights(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(hf_dir / "model.safetensors"))


COMMON = ["log_interval=1", "eval_interval=null", "save_hf=true"]


def test_two_nodes_train_like_one_node_with_two_ranks(tiny_llama, tmp_path):
    """Losses equal to the printed digits and the HF weights bit-identical to a one-node DP=2 run; the data
    cache prepared once in the shared output directory."""
    shared = tmp_path / "shared"
    args = [f"hf_path={tiny_llama}", f"output_dir={shared}", "train_iters=4", "save_interval=4", *COMMON]
    nodes = Nodes(tmp_path, args, "two-nodes")
    try:
        codes = nodes.wait()
    finally:
        nodes.close()
    assert codes == [0, 0], nodes.console(0)[-3000:] + nodes.console(1)[-3000:]
    # Rank 0 (here the node that started first) draws the console: one header, one summary, over both nodes.
    both = nodes.console(0) + nodes.console(1)
    assert both.count("bridge-sft train tiny\n") == 1 and both.count("done: 4 iterations") == 1
    assert "2 processes: TP 1, PP 1, CP 1, DP 2" in both

    one_node = tmp_path / "one-node"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
         f"--master-port={free_port()}", "-m", "bridge_sft.cli", "train", "tiny", f"hf_path={tiny_llama}",
         f"output_dir={one_node}", "train_iters=4", "save_interval=4", *COMMON],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    two = _losses(shared / "logs" / "rank1.log")  # Bridge prints the iteration lines on the last rank
    assert sorted(two) == [1, 2, 3, 4] and len(set(two.values())) > 1
    assert two == _losses(one_node / "logs" / "rank1.log")
    trained = _weights(shared / "checkpoints" / "iter_0000004" / "hf")
    reference = _weights(one_node / "checkpoints" / "iter_0000004" / "hf")
    assert trained.keys() == reference.keys()
    assert all(trained[k].equal(reference[k]) for k in trained)
    assert any(not trained[k].equal(v) for k, v in _weights(tiny_llama).items() if k in trained)  # it trained

    # Prepared once, in the shared output directory: one cache directory (and its lock), nothing half-written;
    # the nodes' working directories hold no outputs (their TMPDIRs may hold scratch files).
    cache = sorted(p.name for p in (shared / "data_cache").iterdir())
    assert len(cache) == 2 and cache[0].startswith(".") and cache[0].endswith(".lock"), cache
    assert (shared / "data_cache" / cache[1] / "meta.json").is_file()
    for node in (0, 1):
        assert sorted(p.name for p in (tmp_path / f"node{node}").iterdir()) == ["console-two-nodes.txt", "tmp"]


def test_two_nodes_preparing_at_the_same_moment_build_the_cache_once(tiny_llama, tmp_path):
    """Two processes in their own working directories start preparing into one shared cache within a
    millisecond: one builds (under the cache's file lock), the other waits and memory-maps the result."""
    cache_dir = tmp_path / "shared" / "data_cache"
    procs, specs = [], []
    for node in (0, 1):
        node_dir = tmp_path / f"node{node}"
        node_dir.mkdir()
        spec = {"tokenizer": str(tiny_llama), "data": str(SAMPLE_DIALOGS), "seq_length": 256,
                "cache_dir": str(cache_dir), "ready": str(node_dir / "ready"), "gate": str(tmp_path / "go"),
                "out": str(node_dir / "result.json")}
        (node_dir / "spec.json").write_text(json.dumps(spec))
        specs.append(spec)
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests/drivers/multinode_prepare.py"),
                                       str(node_dir / "spec.json")], cwd=node_dir, env=_env(node_dir),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 300
    while not all(Path(s["ready"]).exists() for s in specs):
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
        assert time.monotonic() < deadline, "the preparing processes did not get ready"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    for proc in procs:
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-3000:]
    results = [json.loads(Path(s["out"]).read_text()) for s in specs]
    assert sorted(r["cache_hit"] for r in results) == [False, True]
    builder, waiter = sorted(results, key=lambda r: r["cache_hit"])
    assert waiter["entered"] < builder["left"]  # the waiter arrived while the build was under way: a real race
    assert builder["path"] == waiter["path"] and builder["digest"] == waiter["digest"]
    assert builder["samples"] > 1000
    names = sorted(p.name for p in cache_dir.iterdir())  # no temporary directory left behind
    assert names == sorted([Path(builder["path"]).name, f".{Path(builder['path']).name}.lock"])


# gloo's words on the surviving rank, as the runs of the tests below raised them (the peer's process killed, the
# peer frozen), and one that is no lost peer.
GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
               "[10.0.0.2]:61134. This is typically caused by a remote worker crashing. Check the logs of the "
               "remote worker before reporting an error. GLHF!")
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:20708: "
              "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the "
              "application.")
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting "
                "60000ms for send operation to complete")


@pytest.mark.parametrize("message, said", [
    (GLOO_CLOSED, "(Connection closed by peer 10.0.0.2:61134; 16 ranks)"),
    (GLOO_RESET, "(Connection reset by peer 10.0.0.2:20708; 16 ranks)"),
    (GLOO_TIMEOUT, "(Timed out waiting 60000ms for send operation; 16 ranks)"),
])
def test_a_lost_peer_is_one_line_saying_where_the_rerun_resumes(tmp_path, monkeypatch, message, said):
    from bridge_sft.cli.train import lost_rank_error

    monkeypatch.setenv("WORLD_SIZE", "16")
    try:
        try:
            raise RuntimeError(message)
        except RuntimeError as gloo:  # Bridge re-raises the collective's error from its own handler
            raise RuntimeError("Pretrain failed") from gloo
    except RuntimeError as exc:
        raised = exc
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    assert str(lost_rank_error(raised, str(checkpoints))) == (
        f"another rank of this job died or stopped answering {said}. Rerun the same command on every node: "
        "no checkpoint was saved yet, so it starts from the beginning.")
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("400")
    assert str(lost_rank_error(raised, str(checkpoints))).endswith(
        f"Rerun the same command on every node: it resumes from the last checkpoint (iteration 400 in {checkpoints}).")
    assert lost_rank_error(RuntimeError("CUDA out of memory"), str(checkpoints)) is None


@pytest.mark.extended
def test_a_dead_node_stops_the_other_with_one_line_and_the_rerun_resumes(tiny_llama, tmp_path):
    """Node 1 dies (all its processes SIGKILLed) after the checkpoint of iteration 20: node 0 exits within
    the bound, its console saying that a rank was lost and where the rerun resumes; the rerun of both nodes
    resumes from that checkpoint."""
    shared = tmp_path / "shared"
    args = [f"hf_path={tiny_llama}", f"output_dir={shared}", "save_interval=20", *COMMON]
    marker = shared / "checkpoints" / "latest_checkpointed_iteration.txt"
    nodes = Nodes(tmp_path, [*args, "train_iters=100000"], "first")
    try:
        nodes.wait_for_checkpoint(marker, 20)
        while max(_losses(shared / "logs" / "rank1.log"), default=0) < 23:  # a few iterations past it
            assert all(p.poll() is None for p in nodes.procs), nodes.console(0)[-3000:]
            time.sleep(0.05)
        nodes.kill_node(1)
        code, detected = nodes.survivor_exit(0, SURVIVOR_BOUND_S)
    finally:
        nodes.close()
    assert code != 0
    last = int(marker.read_text())
    console = nodes.console(0)
    (line,) = [line for line in console.splitlines() if line.startswith("bridge-sft train failed on rank")]
    assert re.search(r"LostRankError: another rank of this job died or stopped answering \(Connection (closed|reset) "
                     r"by peer 127\.0\.0\.1:\d+; 2 ranks\)\. Rerun the same command on every node: it resumes "
                     rf"from the last checkpoint \(iteration {last} in {re.escape(str(shared / 'checkpoints'))}\)",
                     line), line
    print(f"node 0 exited {detected:.1f} s after node 1 was killed; last checkpoint: iteration {last}")

    before = _losses(shared / "logs" / "rank1.log")
    assert {last + 1, last + 2} <= set(before)  # trained past the checkpoint: the rerun repeats those iterations
    # The same command, stopped two iterations past the checkpoint (train_iters unchanged: the same schedule).
    rerun = Nodes(tmp_path, [*args, "train_iters=100000", f"train.exit_interval={last + 2}"], "rerun")
    try:
        codes = rerun.wait()
    finally:
        rerun.close()
    assert codes == [0, 0], rerun.console(0)[-3000:] + rerun.console(1)[-3000:]
    # Each run appends to the rank's log after a header line: the rerun's iterations are the ones after the last.
    rerun_log = (shared / "logs" / "rank1.log").read_text().rsplit("===== bridge-sft train, rank 1,", 1)[1]
    resumed = {int(i): v for i, v in ITERATION_LOSS.findall(rerun_log)}
    assert sorted(resumed) == [last + 1, last + 2], resumed
    # Weights, optimizer state and data position come back: the repeated iterations' losses are the first run's.
    for i in resumed:
        assert float(resumed[i]) == pytest.approx(float(before[i]), rel=1e-5, abs=0), (i, resumed, before)
    print(f"the rerun resumed at iteration {last + 1}")


@pytest.mark.extended
def test_a_silent_node_stops_the_other_after_the_collective_timeout(tiny_llama, tmp_path):
    """Node 1 stops answering (all its processes SIGSTOPped: a machine or network gone, its sockets left
    open): node 0 notices when Bridge's dist.distributed_timeout_minutes (here 1) runs out in gloo, and
    exits with the same one line."""
    shared = tmp_path / "shared"
    args = [f"hf_path={tiny_llama}", f"output_dir={shared}", "save_interval=20", "train_iters=100000",
            "dist.distributed_timeout_minutes=1", *COMMON]
    marker = shared / "checkpoints" / "latest_checkpointed_iteration.txt"
    nodes = Nodes(tmp_path, args, "silent")
    try:
        nodes.wait_for_checkpoint(marker, 20)
        nodes.kill_node(1, signal.SIGSTOP)
        code, detected = nodes.survivor_exit(0, 60 + SURVIVOR_BOUND_S)
    finally:
        nodes.close()
    assert code != 0
    (line,) = [line for line in nodes.console(0).splitlines() if line.startswith("bridge-sft train failed on rank")]
    assert re.search(r"LostRankError: another rank of this job died or stopped answering \(Timed out waiting "
                     r"60000ms for \w+ operation; 2 ranks\)\. Rerun the same command on every node: it resumes "
                     r"from the last checkpoint \(iteration \d+ in ", line), line
    print(f"node 0 exited {detected:.1f} s after node 1 fell silent (distributed_timeout_minutes=1)")


def test_slurm_example_launches_torchrun_with_the_rendezvous_from_slurm(tmp_path):
    """examples/slurm/train.sbatch under fake Slurm variables, with stand-ins for srun and scontrol: one
    srun of torchrun on every node, c10d rendezvous at the first host of the allocation, the job id as
    the rendezvous id; torchrun's own parser accepts the line."""
    script = REPO / "examples" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{sys.executable} -c 'import json,sys; "
                                  f"print(json.dumps(sys.argv[1:]))' \"$@\" > {tmp_path}/srun.json\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\n[ \"$*\" = \"show hostnames gpu[07-08]\" ] && "
                                      "printf 'gpu07\\ngpu08\\n'\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "8", "OUTPUT_DIR": "/shared/run"}
    proc = subprocess.run(["bash", str(script), "qwen3_8b", "data=/shared/chat.jsonl"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads((tmp_path / "srun.json").read_text())
    at = argv.index("torchrun")
    assert "--ntasks-per-node=1" in argv[:at]  # one torchrun per node, which starts the node's ranks
    from torch.distributed.run import parse_args

    args = parse_args(argv[at + 1:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "8", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id) == ("gpu07:29500", "4242")
    assert args.module and args.training_script == "bridge_sft.cli"
    assert args.training_script_args == ["train", "qwen3_8b", "output_dir=/shared/run", "data=/shared/chat.jsonl"]
