"""2-process gloo runs: global batches split between ranks, weights kept identical, exact eval, and one rank's
fault (a NaN loss, weights drifting apart) stopping every rank with the same one-line error."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from se_surgery.train.checkpoint import load_checkpoint, read_checkpoint
from se_surgery.train.data import build_dataset
from se_surgery.train.distributed import Env, check_replicas_in_sync

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--no-se", "--epochs", "2", "--num-samples", "64", "--batch-size", "16", "--val-samples", "32",
        "--no-progress"]


def test_two_ranks_share_each_batch_stay_in_sync_and_evaluate_exactly(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "se_surgery.train", "--epochs", "1", "--num-samples", "64", "--batch-size", "16",
           "--no-progress", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 rank(s) x 8 x 1 accum" in run.stderr  # each global batch of 16 is split 8 + 8
    assert run.stdout.count("done: best val top-1") == 1  # rank 0 alone reports and writes
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    model, info = load_checkpoint(out / "last.pt")
    # the trainer compares the ranks' weight CRCs at the end of every epoch (and stops if they differ: see
    # test_weights_drifting_apart_on_one_rank_stop_every_rank); the CRC the ranks agreed on is that of the weights saved
    assert metrics["world_size"] == 2 and metrics["weights_crc32"] == check_replicas_in_sync(model, Env())
    assert info["step"] == 4  # 64 images / global batch 16, not 64 / 8
    cfg = info["model_config"]
    val = build_dataset(cfg["data"], "val", input_size=cfg["input_size"], resize=cfg["resize"], mean=cfg["mean"])
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        hits = sum(int((model(chunk).argmax(1) == torch.tensor(val.targets[i: i + 60])).sum())
                   for i, chunk in zip(range(0, len(val), 60), x.split(60)))
    # sharded 180 + 180 and reduced: exactly the single-process count, no sample padded in or counted twice
    assert metrics["val_top1"] == 100 * hits / len(val)


def _ranks(*args: str, timeout: float = 60) -> list[tuple[int, str]]:
    """Start the 2 ranks of ``python -m tests.ddp_faults ARGS`` as torchrun would; each one's exit code and stderr.

    Each rank is its own subprocess, rather than a torchrun child, so that each one's own way out is seen: torchrun's
    agent would kill the survivors of a failed rank and hide whether they would have stopped by themselves.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.ddp_faults", *args], cwd=ROOT, text=True,
                              env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for rank in range(2)]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            err = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))[1]
            results.append((p.returncode, err))
        return results
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank was still running after {timeout} s: it waits for a rank that stopped")
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_same_error(tmp_path):
    pytest.importorskip("timm")  # the faulty models are registered as timm archs
    out = tmp_path / "nan"
    (rc0, err0), (rc1, err1) = _ranks("--arch", "timm:nan_on_rank1", *TINY, "--out", str(out))
    line0, line1 = err0.strip().splitlines()[-1], err1.strip().splitlines()[-1]
    assert (rc0, rc1) == (2, 2), (err0[-2000:], err1[-2000:])
    # rank 1's 6th training forward: epoch 2's 2nd step; both ranks name rank 1 and stop before the optimizer step
    expected = "python -m se_surgery.train: error: the loss became nan on rank 1 at step 6 (epoch 2)"
    assert line0 == line1 and line0.startswith(expected), line0
    assert "last good checkpoint" in line0
    kept = read_checkpoint(out / "last.pt")
    assert (kept["epoch"], kept["step"]) == (1, 4) and all(torch.isfinite(t).all() for t in kept["model"].values())


def test_weights_drifting_apart_on_one_rank_stop_every_rank(tmp_path):
    pytest.importorskip("timm")  # the faulty models are registered as timm archs
    out = tmp_path / "drift"
    (rc0, err0), (rc1, err1) = _ranks("--arch", "timm:drift_on_rank1", *TINY, "--out", str(out))
    line0, line1 = err0.strip().splitlines()[-1], err1.strip().splitlines()[-1]
    assert (rc0, rc1) == (2, 2) and line0 == line1 and "the ranks' weights differ" in line0, (err0[-2000:], err1)
    assert not (out / "last.pt").exists()  # nothing of the diverged run is saved


def test_two_ranks_fine_tune_a_frozen_backbone_from_a_weights_file(tmp_path):
    """--recipe finetune --weights under DDP: the epoch-0 row, two parameter groups, the frozen weights untouched."""
    import torchvision

    torch.manual_seed(1)
    weights = tmp_path / "plain.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    out = tmp_path / "ddp_ft"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "se_surgery.train", "--recipe", "finetune", "--weights", str(weights), "--freeze-backbone",
           "--epochs", "1", "--num-samples", "64", "--batch-size", "16", "--val-samples", "32", "--no-progress",
           "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["world_size"] == 2
    info = read_checkpoint(out / "last.pt")
    assert [g["name"] for g in info["optimizer"]["param_groups"]] == ["pretrained", "new"]
    before = torch.load(weights, weights_only=True)
    frozen = info["groups"]["frozen"]
    rescaled = {k for k in frozen if ".bn2." in k}  # the BatchNorm before each SE: divided by the gates' 0.5 once
    assert len(rescaled) == 16 and all(torch.equal(before[k] / 0.5, info["model"][k]) for k in rescaled)
    assert all(torch.equal(before[k], info["model"][k]) for k in frozen if k not in rescaled)
    assert not torch.equal(before["fc.weight"], info["model"]["fc.weight"])
