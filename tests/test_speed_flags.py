"""The speed flags on the CPU: --amp (bf16 autocast), --channels-last and --compile (inductor) really run, train,
save, resume bit for bit and are recorded as on; --sync-bn alone is skipped off CUDA, with a note.

The compiled runs use timm's resnet10t (4 residual blocks, an SE in each): inductor compiles a forward and backward
graph for it in about a minute on 2 busy cores, several times faster than for ResNet-18. Torch runs on one thread
here: these tiny steps gain little from a second one, and lose a lot on a machine shared with other jobs.
"""

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from se_surgery.train.checkpoint import load_checkpoint, read_checkpoint
from se_surgery.train.cli import main

# 4 steps of 16 images an epoch, 32 val images, He init (no zero-init residual) and an lr at which 8 steps lower the
# loss on every flag combination tried
TINY = ["--epochs", "2", "--num-samples", "64", "--batch-size", "16", "--val-samples", "32", "--lr", "0.02",
        "--arch-kwargs", "{}", "--no-progress"]
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--arch", "timm:resnet10t"]  # for the compiled runs
TIMING = {"images_per_s", "seconds"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_run(out: Path, flags: dict[str, bool]) -> None:
    """The run finished 2 epochs with a finite, falling loss, wrote its checkpoints and recorded ``flags``."""
    metrics = _metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    losses = [m["train_loss"] for m in metrics]
    assert all(map(torch.isfinite, torch.tensor(losses + [m["val_loss"] for m in metrics])))
    assert losses[1] < losses[0], losses
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in flags} == flags
    assert {"last.pt", "best.pt"} <= {p.name for p in out.iterdir()}
    saved = read_checkpoint(out / "last.pt")
    assert saved["config"] == config and saved["epoch"] == 2
    assert not [k for k in saved["model"] if k.startswith(("module.", "_orig_mod."))]  # no wrapper in the keys
    model, _ = load_checkpoint(out / "last.pt")  # rebuilds the plain model and loads the weights strictly
    assert next(model.parameters()).dtype == torch.float32  # autocast leaves the weights float32


def _check_resume_is_bit_exact(tmp_path: Path, whole: Path, args: list[str]) -> None:
    """1 epoch, then ``--resume auto`` to 2: the same weights and metrics as the run of 2 epochs in one go."""
    split = tmp_path / "split"
    assert main([*args, "--epochs", "1", "--out", str(split)]) == 0
    assert main([*args, "--resume", "auto", "--out", str(split)]) == 0
    a, b = read_checkpoint(whole / "last.pt"), read_checkpoint(split / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    strip = [{k: v for k, v in m.items() if k not in TIMING} for m in _metrics(split)]
    assert strip == [{k: v for k, v in m.items() if k not in TIMING} for m in _metrics(whole)]


@pytest.mark.parametrize("flag", ["--amp", "--channels-last"])
def test_each_eager_flag_alone_trains_saves_and_resumes_bit_exactly(tmp_path, flag):
    args = [*TINY, flag]
    whole = tmp_path / "whole"
    assert main([*args, "--out", str(whole)]) == 0
    name = flag[2:].replace("-", "_")
    _check_run(whole, {"amp": name == "amp", "channels_last": name == "channels_last", "compile": False})
    _check_resume_is_bit_exact(tmp_path, whole, args)


EVERY_FLAG = [*TINY, *SMALL, "--amp", "--channels-last", "--compile", "--sync-bn"]


def _train_with_every_flag(tmp_path, caplog) -> Path:
    """One run with every speed flag on, its log in ``caplog``; returns its run folder."""
    pytest.importorskip("timm")
    whole = tmp_path / "whole"
    with caplog.at_level(logging.INFO, logger="se_surgery"):
        assert main([*EVERY_FLAG, "--out", str(whole)]) == 0
    return whole


def test_all_flags_together_train_and_resume_bit_exactly_sync_bn_skipped_with_a_note(tmp_path, caplog):
    args, whole = EVERY_FLAG, _train_with_every_flag(tmp_path, caplog)
    notes = [r.getMessage() for r in caplog.records if "--sync-bn" in r.getMessage()]
    assert notes == ["note: --sync-bn syncs BatchNorm statistics across CUDA ranks; it does nothing on the CPU: "
                     "ignored"]
    assert not [r for r in caplog.records if r.getMessage().startswith("note:") and "--sync-bn" not in r.getMessage()]
    _check_run(whole, {"amp": True, "channels_last": True, "compile": True, "sync_bn": False})
    _check_resume_is_bit_exact(tmp_path, whole, args)


def test_two_gloo_ranks_with_compile_and_amp(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "ddp"
    # each rank trains on 16 images a step, as the single process above: the same graphs, so inductor's cache
    # (when it is warm) saves recompiling them; 4 steps an epoch
    flags = ["--compile", "--amp", "--channels-last", "--batch-size", "32", "--num-samples", "128"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "se_surgery.train", *TINY, *SMALL, *flags, "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 rank(s) x 16 x 1 accum" in run.stderr
    _check_run(out, {"amp": True, "channels_last": True, "compile": True})
    assert {m["world_size"] for m in _metrics(out)} == {2}  # and the ranks' weight CRCs agreed at every epoch


# --- the same on a GPU: skipped without one (tests/conftest.py); benchmarks/gpu_check.py runs them -------------------
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_fused_and_unfused_se_agree_on_cuda(layout):
    from .test_fused import LAYOUTS, MODELS, outputs_and_gradients, pair, relative_error

    make, size = MODELS["bottleneck"]
    memory = LAYOUTS[layout]
    x = torch.randn(4, 3, size, size, dtype=torch.float64).contiguous(memory_format=memory)
    models = [m.cuda() for m in pair(make, torch.float64, memory)]
    for train in (True, False):
        exact = [outputs_and_gradients(m, x.cuda(), train) for m in models]
        for k, v in exact[0].items():
            torch.testing.assert_close(v, exact[1][k], rtol=1e-9, atol=1e-12, msg=f"train={train} {k}")
    reference = {k: v.cpu() for k, v in outputs_and_gradients(models[0], x.cuda()).items()}
    for dtype, floor in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        found = [{k: v.cpu() for k, v in outputs_and_gradients(m.cuda(), x.to(dtype).cuda()).items()}
                 for m in pair(make, dtype, memory)]
        for k, v in reference.items():
            fused_error, unfused_error = relative_error(found[0][k], v), relative_error(found[1][k], v)
            assert fused_error <= 3 * unfused_error + floor, (dtype, k, fused_error, unfused_error)


@pytest.mark.cuda
def test_amp_channels_last_training_steps_on_cuda():
    import torchvision

    from se_surgery import add_se

    torch.manual_seed(0)
    model = add_se(torchvision.models.resnet18(num_classes=10), example_input=torch.zeros(2, 3, 64, 64))
    model.cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(16, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device="cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(5):  # the same batch: the loss must fall
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # eval: the fused sum written in place
        model.eval()
        assert torch.isfinite(model(x).float()).all()


@pytest.mark.cuda
def test_trainer_with_every_speed_flag_on_cuda(tmp_path, caplog):
    args, whole = EVERY_FLAG, _train_with_every_flag(tmp_path, caplog)
    assert "--sync-bn syncs BatchNorm statistics across CUDA ranks; it does nothing on a single rank" in caplog.text
    _check_run(whole, {"amp": True, "channels_last": True, "compile": True, "sync_bn": False})
    # a resume continues under the same flags (CUDA kernels are not bit-reproducible: not compared bit for bit)
    split = tmp_path / "split"
    assert main([*args, "--epochs", "1", "--out", str(split)]) == 0
    assert main([*args, "--resume", "auto", "--out", str(split)]) == 0
    _check_run(split, {"amp": True, "channels_last": True, "compile": True})


def test_gpu_check_runs_its_cpu_path(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "check.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["part"] for r in rows} == {"cuda tests", "surgery", "trainer", "ddp", "capture"}
    assert all(math.isfinite(float(r["value"])) for r in rows), rows
    checks = {r["check"]: float(r["value"]) for r in rows}
    assert checks["failed"] == 0 and checks["skipped"] >= 4  # the cuda tests, skipped on the CPU
    assert checks["trainer / bare loop"] > 0
    assert checks["SE: capture / plain"] > 0 and checks["timm SE: capture / plain"] > 0
    train = {k.rpartition(": ")[2]: v for k, v in checks.items() if k.startswith("train step AMP + channels-last")}
    assert {"SE fused / plain", "SE autograd / plain", "timm SE / plain", "floor / plain"} <= set(train)
    assert train["floor / plain"] > 1  # the pooling and its backward cost something
    assert any(k.startswith("DDP step (gloo, 1 rank)") for k in checks)
    assert out.read_text().startswith("| part | check | value | unit | detail |")
    assert "trainer / bare loop" in run.stdout  # the printed table
