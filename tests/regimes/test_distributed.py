"""Distributed parallel training: 2 gloo processes over loopback equal the single process."""
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

from click.testing import CliRunner
import pytest
import torch

from edgetrain.cli import cli
from edgetrain.errors import UserError
from edgetrain.regimes.distributed import rank_groups
from edgetrain.regimes.p2p import END, HEADER_LEN, Inbox, Outbox, decode_header, encode_header
from edgetrain.regimes.schedule import evaluate_run, train
from edgetrain.storage.codec import read_tensors
from edgetrain.storage.modules import module_path
from tests.conftest import tiny_cfg

TINY = ["--data", "digits", "--train-size", "400", "--model", "kmresnet", "--width", "8",
        "--depth", "4", "--modules", "2", "--epochs", "2", "--batch-size", "64", "--lr", "0.05",
        "--seed", "0", "--mode", "parallel", "--device", "cpu", "--no-progress"]  # gloo on CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **extra}


def torchrun(nproc: int, args: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "edgetrain.cli", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=loopback_env())


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): channels-last CPU kernels
    try:  # (AVX-512, #29) sum differently at another thread count
        metrics = train(tiny_cfg(mode="parallel", train_size=400, device="cpu"), out)
    finally:
        torch.set_num_threads(threads)
    return out, metrics


@pytest.mark.parametrize("buffer_size", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_two_ranks_train_the_same_weights_as_one_process(buffer_size, single_run, tmp_path):
    out = tmp_path / "dist"
    p = torchrun(2, [*TINY, "--distributed", "--buffer-size", str(buffer_size), "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("best depth") == 1  # only rank 0 reports
    ref_dir, ref = single_run
    for k in range(2):  # each rank wrote its own module into the one run directory
        a, b = read_tensors(module_path(ref_dir, k)), read_tensors(module_path(out, k))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    m = json.loads((out / "metrics.json").read_text())
    assert m["distributed"]["rank_modules"] == [[0], [1]]
    assert m["distributed"]["buffer_size"] == buffer_size
    assert [mm["steps"] for mm in m["modules"]] == [mm["steps"] for mm in ref["modules"]]
    for got, want in zip(m["modules"], ref["modules"]):  # val/test streamed through the ranks
        assert got["test_acc"] == pytest.approx(want["test_acc"], abs=2 / 360)
    again = evaluate_run(out)  # `edgetrain eval` reads the run like a single-process one
    assert [e["test_acc"] for e in again["modules"]] == pytest.approx(
        [mm["test_acc"] for mm in m["modules"]], abs=1e-9)


def test_missing_launcher_environment_is_one_line_exit_2(monkeypatch, tmp_path):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    r = CliRunner().invoke(cli, ["train", *TINY, "--distributed", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "torchrun" in r.output
    assert "RANK" in r.output and not (tmp_path / "r").exists()


def test_more_processes_than_modules_is_one_line_exit_2(monkeypatch, tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(cli, ["train", *TINY, "--distributed", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2, r.output
    assert "3 processes but only 2 modules" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,needle", [
    (["--mode", "multilap", "--distributed"], "--distributed needs --mode parallel"),
    (["--buffer-size", "-1"], "--buffer-size"),
    (["--mode", "parallel", "--distributed", "--memory-budget", "2GiB"], "not enforced per rank"),
])
def test_bad_distributed_options(args, needle):
    r = CliRunner().invoke(cli, ["train", *args])
    assert r.exit_code == 2 and needle in r.output, r.output


@pytest.mark.slow  # ~30 s: two ranks start torch and train
def test_two_ranks_train_from_an_image_folder(tmp_path):
    """Both ranks open a new folder's pack at once (launched without torchrun): one decodes
    it, the other waits on the pack's writer lock; metrics.json is a folder run's and eval
    reads the run."""
    from tests.data.test_data_folder import digits_arrays, write_folder  # the folder writer
    x, y = digits_arrays(300)
    folder = write_folder(tmp_path / "photos", x, y, size=16)
    out, cache, port = tmp_path / "run", tmp_path / "c", free_port()
    assert TINY[:4] == ["--data", "digits", "--train-size", "400"]
    args = ["--data", str(folder), "--data-cache", str(cache), *TINY[4:], "--distributed",
            "--out", str(out)]
    procs = [subprocess.Popen([sys.executable, "-m", "edgetrain.cli", "train", *args],
                              env=loopback_env(RANK=str(rank), WORLD_SIZE="2",
                                               LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                               MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs
    m = json.loads((out / "metrics.json").read_text())
    assert m["distributed"]["rank_modules"] == [[0], [1]]
    assert m["data"]["counts"] == {"train": 240, "test": 60}  # the folder's train/ and test/
    assert m["data"]["skipped_bad_images"] == 0
    assert m["best_test_acc"] > 0.1  # above chance (10 classes)
    packs = list(cache.iterdir())  # one pack; no lock file or temporary directory left
    assert len(packs) == 1 and packs[0].name.startswith("photos-"), packs
    prep = json.loads((out / "preprocessing.json").read_text())
    assert prep["class_names"] == [f"class{i}" for i in range(10)]
    again = evaluate_run(out)
    assert [e["test_acc"] for e in again["modules"]] == pytest.approx(
        [mm["test_acc"] for mm in m["modules"]], abs=1e-9)


def test_a_dying_rank_stops_the_other_with_exit_2(tmp_path):
    """Launched without torchrun (whose agent would kill the survivor itself): once training
    has started, rank 1 is killed; rank 0 must notice and stop on its own, not hang."""
    out, port = tmp_path / "run", free_port()
    args = [*TINY[:-1], "--epochs", "200", "--distributed", "--out", str(out)]
    procs, err0 = [], []
    for rank in range(2):
        env = loopback_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        progress = "--progress" if rank == 0 else "--no-progress"  # rank 0's bar: training began
        procs.append(subprocess.Popen([sys.executable, "-m", "edgetrain.cli", "train", *args,
                                       progress], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    reader = threading.Thread(target=lambda: err0.extend(iter(lambda: procs[0].stderr.read(1), "")))
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while "parallel (rank 0)" not in "".join(err0):
            assert time.monotonic() < deadline and procs[0].poll() is None, "".join(err0)
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        reader.join(10)
    last = "".join(err0).replace("\r", "\n").strip().splitlines()[-1]
    assert procs[0].returncode == 2, "".join(err0)
    assert last.startswith("error: rank 0: lost contact") and "rank 1" in last, last
    assert not (out / "metrics.json").exists()


# ----------------------------------------------------------------------------- units

def test_rank_groups_are_contiguous_balanced_and_refuse_too_many_ranks():
    assert rank_groups([5, 1, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4, 5]]
    assert rank_groups([1, 1, 1, 1], 2) == [[0, 1], [2, 3]]
    assert rank_groups([3, 3, 3], 3) == [[0], [1], [2]]
    with pytest.raises(UserError, match="4 processes but only 3 modules"):
        rank_groups([1, 1, 1], 4)


def test_header_round_trip():
    z = torch.zeros(7, 3, 5, 2, dtype=torch.bfloat16)
    h = encode_header(4, 9, z)
    assert h.shape == (HEADER_LEN,)
    assert decode_header(h) == (4, 9, torch.bfloat16, (7, 3, 5, 2))
    assert decode_header(encode_header(END, 0, None))[0] == END


class QueueLink:
    """An in-memory link: send puts, recv gets; `gate` blocks sending until set."""

    def __init__(self):
        self.q, self.gate, self.sent = queue.Queue(), threading.Event(), 0

    def send(self, *msg):
        self.gate.wait(10)
        if msg[0] == "boom":
            raise RuntimeError("Connection closed by peer")
        self.sent += 1
        self.q.put(msg)

    def recv(self):
        return self.q.get(timeout=10)


def test_outbox_holds_at_most_capacity_messages_then_blocks():
    link = QueueLink()
    box = Outbox(link, capacity=2, poll_s=0.01)
    done = []
    t = threading.Thread(target=lambda: [box.put(0, i, None, i) or done.append(i) for i in range(5)])
    t.start()
    time.sleep(0.3)
    assert len(done) == 3  # 2 queued + 1 taken by the blocked send thread
    link.gate.set()
    t.join(5)
    box.close(5)
    got = [link.recv() for _ in range(6)]
    assert [g[1] for g in got[:5]] == [0, 1, 2, 3, 4] and got[5][0] == END


@pytest.mark.parametrize("capacity", [0, 3])
def test_inbox_delivers_in_order_and_checks_the_sequence(capacity):
    link = QueueLink()
    link.gate.set()
    for i in range(4):
        link.send(0, i, f"z{i}", f"y{i}")
    link.send(END, 0, None, None)
    box = Inbox(link, capacity)
    assert [box.get(0, i) for i in range(4)] == [(f"z{i}", f"y{i}") for i in range(4)]
    box.close()
    bad = QueueLink()
    bad.gate.set()
    bad.send(0, 1, "z", "y")
    with pytest.raises(RuntimeError, match="protocol error"):
        Inbox(bad, capacity).get(0, 0)


def test_send_errors_reach_the_training_thread():
    link = QueueLink()
    link.gate.set()
    box = Outbox(link, capacity=1, poll_s=0.01)
    box.put("boom", 0, None, None)
    with pytest.raises(RuntimeError, match="closed by peer"):
        for i in range(100):
            box.put(0, i, None, None)
            time.sleep(0.01)
