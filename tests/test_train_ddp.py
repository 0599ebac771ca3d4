"""A 2-process gloo run under torchrun: global batches split between ranks, weights kept identical, exact eval."""

import json
import subprocess
import sys

import torch

from se_surgery.train.checkpoint import load_checkpoint
from se_surgery.train.data import build_dataset


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
    # the trainer compares the ranks' weight CRCs at the end of every epoch and stops if they differ
    assert metrics["world_size"] == 2 and isinstance(metrics["weights_crc32"], int)
    model, info = load_checkpoint(out / "last.pt")
    assert info["step"] == 4  # 64 images / global batch 16, not 64 / 8
    cfg = info["model_config"]
    val = build_dataset(cfg["data"], "val", input_size=cfg["input_size"], resize=cfg["resize"], mean=cfg["mean"])
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        hits = sum(int((model(chunk).argmax(1) == torch.tensor(val.targets[i: i + 60])).sum())
                   for i, chunk in zip(range(0, len(val), 60), x.split(60)))
    # sharded 180 + 180 and reduced: exactly the single-process count, no sample padded in or counted twice
    assert metrics["val_top1"] == 100 * hits / len(val)
