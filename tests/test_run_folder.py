"""A run folder belongs to one run: the lock, --resume auto without last.pt, the order of the end-of-epoch saves,
leftover temp files, what a resume may change, and the file system's errors (file, read-only, full disk, Ctrl-C)."""

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from se_surgery.errors import CheckpointError, TrainError
from se_surgery.train import checkpoint, get_recipe, loop, train
from se_surgery.train.checkpoint import read_checkpoint, save_checkpoint
from se_surgery.train.cli import main
from se_surgery.train.recipe import Recipe
from se_surgery.train.resume import RESUME_MAY_CHANGE, resolve_resume
from se_surgery.train.run_lock import LOCK_NAME, RunLock
from tests.helpers import one_line_error

# 4 steps of 16 images an epoch, 32 val images, on timm's 0.4M-parameter test ResNet (3 MB checkpoints); lr 0.03
# makes epoch 2 the best one (val top-1 0% then 25%)
TINY = ["--arch", "timm:test_resnet", "--arch-kwargs", "{}", "--reduction", "4", "--epochs", "2", "--num-samples",
        "64", "--batch-size", "16", "--val-samples", "32", "--lr", "0.03", "--no-progress"]
TINY_RECIPE = dict(arch="timm:test_resnet", arch_kwargs={}, reduction=4, epochs=2, num_samples=64, batch_size=16,
                   val_samples=32, lr=0.03)


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A finished 2-epoch tiny run whose best epoch is its last."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    train(get_recipe(**TINY_RECIPE), out, progress=False)
    top1 = [m["val_top1"] for m in _metrics(out)]
    assert top1[1] > top1[0], top1  # the premise of the best.pt/last.pt order test
    return out


def _copy(tiny, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny, out)
    return out


# --- the lock ------------------------------------------------------------------------------------------------------

def test_a_second_trainer_on_a_busy_out_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, "-m", "se_surgery.train", *TINY, "--epochs", "50", "--out", str(out)],
                             stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((out / LOCK_NAME).exists() or (out / "config.json").exists()) and first.poll() is None:
            assert time.monotonic() < deadline, "the first trainer never started"
            time.sleep(0.02)
        assert first.poll() is None, "the first trainer ended before the second started"
        err = one_line_error(main, capsys, [*TINY, "--out", str(out), "--resume", "auto"])
        assert f"pid {first.pid} on this host {socket.gethostname()}" in err and "another --out" in err, err
        assert first.poll() is None  # the first one trains on, its lock in place
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid
    finally:
        first.kill()
        first.wait()


def _write_lock(out, **holder):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"started": "2026-01-01 00:00:00 UTC", **holder}))


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_lock_of_a_dead_process_on_this_host_is_replaced_with_a_note(tmp_path, caplog):
    zombie = subprocess.Popen(["true"])  # exited, never waited for: its pid still answers os.kill(pid, 0)
    time.sleep(0.2)
    try:
        for i, holder in enumerate([
            {"pid": _dead_pid()},
            {"pid": zombie.pid},
            {"pid": os.getppid(), "pid_start": 1},  # the pid is alive, but a younger process took it over
            {"pid": os.getpid()},  # this process's pid, in a folder it does not hold: an earlier life of the pid
        ]):
            out = tmp_path / str(i)
            _write_lock(out, host=socket.gethostname(), **holder)
            with caplog.at_level(logging.INFO, logger="se_surgery"):
                with RunLock(out) as lock:
                    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
            assert "replaced the stale lock" in caplog.text and f"pid {holder['pid']}" in caplog.text, holder
            assert not (out / LOCK_NAME).exists()  # released
            caplog.clear()
    finally:
        zombie.wait()


@pytest.mark.parametrize("holder, expected", [
    ({"host": "elsewhere", "pid": 1}, ["pid 1 on host elsewhere", "cannot tell", f"delete {{out}}/{LOCK_NAME}"]),
    ({"host": socket.gethostname(), "pid": os.getppid()}, [f"pid {os.getppid()} on this host", f"kill {os.getppid()}"]),
    ({}, ["cannot be read", "another --out"]),
])
def test_a_live_or_foreign_lock_is_refused_naming_its_holder(tmp_path, capsys, holder, expected):
    out = tmp_path / "run"
    _write_lock(out, **holder)
    if not holder:
        (out / LOCK_NAME).write_text("{not json")
    before = (out / LOCK_NAME).read_bytes()
    with pytest.raises(TrainError) as error:
        with RunLock(out):
            pytest.fail("entered a folder another trainer holds")
    for fragment in expected:
        assert fragment.format(out=out) in str(error.value), str(error.value)
    assert (out / LOCK_NAME).read_bytes() == before  # never taken over
    err = one_line_error(main, capsys, [*TINY, "--out", str(out)])  # the CLI, before it reads anything
    assert expected[0].format(out=out) in err


def test_the_lock_is_released_on_error_and_ctrl_c_and_an_empty_new_folder_removed(tmp_path):
    out = tmp_path / "new" / "run"
    for exc in (TrainError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with RunLock(out):
                assert (out / LOCK_NAME).exists()
                raise exc
        assert not out.exists()  # created for the run, left empty: gone again
    out.mkdir(parents=True)
    with RunLock(out):
        (out / "config.json").write_text("{}")
        with pytest.raises(TrainError, match="another run of this process"):
            RunLock(out).acquire()
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


# --- --resume auto without last.pt ---------------------------------------------------------------------------------

def test_resume_auto_refuses_a_folder_with_results_but_no_last_pt(tmp_path, tiny, capsys):
    out = _copy(tiny, tmp_path)
    (out / "last.pt").unlink()
    best, metrics = (out / "best.pt").read_bytes(), (out / "metrics.jsonl").read_bytes()
    err = one_line_error(main, capsys, [*TINY, "--out", str(out), "--resume", "auto"])
    assert f"{out} holds best.pt and 2 epoch(s) in metrics.jsonl but no last.pt" in err, err
    assert f"--resume {out / 'best.pt'}" in err and "another --out" in err
    assert (out / "best.pt").read_bytes() == best and (out / "metrics.jsonl").read_bytes() == metrics
    (out / "best.pt").unlink()
    err = one_line_error(main, capsys, [*TINY, "--out", str(out), "--resume", "auto"])
    assert "holds 2 epoch(s) in metrics.jsonl but no last.pt" in err and f"--resume {out}" not in err, err


def test_resume_auto_starts_afresh_where_only_an_epoch_0_evaluation_was_written(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "val_top1": 10.0}) + "\n")
    assert resolve_resume("auto", tmp_path).state is None
    (tmp_path / "metrics.jsonl").write_text("garbage\n")  # not an epoch 0 row: kept as a result
    with pytest.raises(TrainError, match="1 epoch"):
        resolve_resume("auto", tmp_path)


# --- best.pt before last.pt ----------------------------------------------------------------------------------------

# Train, and die by SIGKILL just after the first checkpoint file of the last epoch is written.
_KILLED_AT_LAST_EPOCH = """
import os, signal, sys
from se_surgery.train import loop
from se_surgery.train.cli import main
real = loop.save_checkpoint
def save(path, payload):
    real(path, payload)
    if payload["epoch"] == 2 and payload["epoch_step"] == 0:
        os.kill(os.getpid(), signal.SIGKILL)
loop.save_checkpoint = save
main(sys.argv[1:])
"""


def test_a_kill_between_the_last_epochs_two_saves_leaves_a_best_pt_that_is_the_best(tmp_path, tiny, capsys, caplog):
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED_AT_LAST_EPOCH), *TINY, "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    lock_left = (out / LOCK_NAME).exists()  # a killed trainer leaves its lock behind
    with caplog.at_level(logging.INFO, logger="se_surgery"):
        assert main([*TINY, "--out", str(out), "--resume", "auto"]) == 0
    reported = float(capsys.readouterr().out.split("best val top-1 ")[1].split("%")[0])
    best, reference = read_checkpoint(out / "best.pt"), read_checkpoint(tiny / "best.pt")
    assert best["epoch"] == reference["epoch"] == 2 and round(best["best_top1"], 2) == reported
    assert _same_weights(best["model"], reference["model"])  # the best epoch's weights, bit for bit
    assert [m["epoch"] for m in _metrics(out)] == [1, 2]
    assert lock_left and "replaced the stale lock" in caplog.text and not (out / LOCK_NAME).exists()


# --- temp files of a killed save -----------------------------------------------------------------------------------

def test_the_temp_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path, tiny, caplog):
    out = _copy(tiny, tmp_path)
    for name in (".last.pt.tmp-123", ".best.pt.tmp-45678"):
        (out / name).write_bytes(b"PK half a zip")
    (out / "notes.tmp-1").write_text("the user's")
    with caplog.at_level(logging.INFO, logger="se_surgery"):
        train(get_recipe(**TINY_RECIPE), out, resume="auto", progress=False)  # finished: nothing to train
    assert "removed 2 temporary file(s)" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl",
                                                     "notes.tmp-1"]


# --- what a resume may change --------------------------------------------------------------------------------------

def test_every_recipe_field_has_a_resume_rule():
    assert set(RESUME_MAY_CHANGE) == {f.name for f in dataclasses.fields(Recipe)}
    may = {k for k, v in RESUME_MAY_CHANGE.items() if v}
    assert {"lr", "lr_step", "lr_gamma", "momentum", "weight_decay", "epochs", "workers", "amp", "channels_last",
            "compile"} <= may
    assert not may & {"arch", "arch_kwargs", "se", "reduction", "se_init", "position", "squeeze", "excitation",
                      "se_bias", "where", "pretrained", "data", "seed", "batch_size", "num_samples", "class_aware",
                      "input_size", "resize", "min_scale", "flip", "mean"}


def test_a_resume_that_changes_what_is_trained_is_refused_naming_every_field(tmp_path, tiny, capsys):
    out = _copy(tiny, tmp_path)
    config = (out / "config.json").read_bytes()
    err = one_line_error(main, capsys, ["--out", str(out), "--resume", "auto", "--seed", "1", "--batch-size", "32",
                                        "--crop", "40", "--reduction", "8"])
    for diff in ("seed 0 -> 1", "batch_size 16 -> 32", "input_size 32 -> 40", "reduction 4 -> 8"):
        assert diff in err, err
    assert (out / "config.json").read_bytes() == config
    with pytest.raises(TrainError, match=r"another arch, where \(arch timm:test_resnet -> resnet34, where None -> \["):
        train(get_recipe(**{**TINY_RECIPE, "arch": "resnet34", "where": ["4"]}), out, resume="auto", progress=False)
    assert (out / "config.json").read_bytes() == config


def test_a_resume_may_change_the_schedule_and_the_speed_flags(tmp_path, tiny, capsys, caplog):
    out = _copy(tiny, tmp_path)
    with caplog.at_level(logging.INFO, logger="se_surgery"):
        assert main(["--out", str(out), "--resume", "auto", "--lr", "0.01", "--momentum", "0.5", "--workers", "1",
                     "--ckpt-every", "2", "--accum-steps", "2", "--eval-batch-size", "8", "--no-progress"]) == 0
    assert "resume: lr 0.03 -> 0.01, momentum 0.9 -> 0.5" in caplog.text, caplog.text
    saved = json.loads((out / "config.json").read_text())
    assert (saved["lr"], saved["workers"], saved["accum_steps"]) == (0.01, 1, 2)


# --- the file system's errors --------------------------------------------------------------------------------------

@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if the trainer gets as far as loading data."""
    monkeypatch.setattr(loop, "build_dataset", lambda *a, **k: pytest.fail("loaded data before refusing the --out"))


def test_an_out_that_is_a_file_or_inside_one_is_refused_before_any_work(tmp_path, capsys, no_data):
    (tmp_path / "file").write_text("x")
    err = one_line_error(main, capsys, [*TINY, "--out", str(tmp_path / "file")])
    assert f"--out {tmp_path / 'file'} is a file, not a folder: pass another --out" in err, err
    err = one_line_error(main, capsys, [*TINY, "--out", str(tmp_path / "file" / "run")])
    assert f"lies inside {tmp_path / 'file'}, which is a file: pass an --out inside a folder" in err, err
    with pytest.raises(TrainError, match="is a file, not a folder"):
        train(get_recipe(**TINY_RECIPE), tmp_path / "file", progress=False)


def test_a_read_only_out_is_refused_before_any_work(tmp_path, capsys, no_data, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:  # root writes anyway: then only the simulated cases below
        out.chmod(0o555)
        err = one_line_error(main, capsys, [*TINY, "--out", str(out)])
        assert f"{out} is not writable" in err and "fix its permissions" in err, err
        out.chmod(0o755)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == out else access(p, mode, **k))
    err = one_line_error(main, capsys, [*TINY, "--out", str(out)])
    assert f"--out {out}: {out} is not writable" in err and "fix its permissions" in err, err
    monkeypatch.setattr(os, "access", access)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(out / LOCK_NAME))

    monkeypatch.setattr(os, "link", read_only)  # a read-only mount: the lock cannot be made
    err = one_line_error(main, capsys, [*TINY, "--out", str(out)])
    assert f"cannot write to --out {out} (Read-only file system): pick a folder" in err, err
    assert list(out.iterdir()) == []  # nothing left behind


def _fail_after(monkeypatch, error, keep=0):
    """Make torch.save write a few bytes and then raise ``error``, after ``keep`` real saves."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= keep:
            return real(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 part of a zip")
        raise error

    monkeypatch.setattr(checkpoint.torch, "save", save)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_full_disk_or_ctrl_c_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_config": {}, "version": 1})
    before = path.read_bytes()
    _fail_after(monkeypatch, error)
    with pytest.raises(CheckpointError if isinstance(error, OSError) else KeyboardInterrupt) as raised:
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "model_config": {}, "version": 2})
    if isinstance(error, OSError):
        assert str(raised.value) == (f"cannot write the checkpoint {path} (No space left on device): last.pt still "
                                     "holds the previous checkpoint; free some disk space, then resume with "
                                     "--resume auto")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_torchs_write_error_of_a_full_disk_is_named_as_one(tmp_path, monkeypatch):
    """torch's zip writer turns the file's OSError into a RuntimeError raised while handling it."""
    def save(obj, f, *args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(CheckpointError, match=r"\(No space left on device\): no best.pt was written; free"):
        save_checkpoint(tmp_path / "best.pt", {})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_or_ctrl_c_while_training_keeps_last_pt_and_leaves_no_temp_file(tmp_path, tiny, capsys,
                                                                                     monkeypatch):
    out = _copy(tiny, tmp_path)
    before = (out / "last.pt").read_bytes()
    _fail_after(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    err = one_line_error(main, capsys, ["--out", str(out), "--resume", "auto", "--epochs", "3"])
    assert "cannot write the checkpoint" in err and "(No space left on device): " in err, err
    assert "still holds the previous checkpoint; free some disk space, then resume with --resume auto" in err, err
    files = ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
    assert (out / "last.pt").read_bytes() == before and sorted(p.name for p in out.iterdir()) == files
    _fail_after(monkeypatch, KeyboardInterrupt())
    assert main(["--out", str(out), "--resume", "auto", "--epochs", "3", "--no-progress"]) == 130
    assert (out / "last.pt").read_bytes() == before and sorted(p.name for p in out.iterdir()) == files


def test_ctrl_c_that_torchs_zip_writer_reports_as_its_own_error_is_still_an_interruption(tmp_path, tiny, capsys,
                                                                                         monkeypatch):
    """A real SIGINT inside torch.save ends in torch's RuntimeError raised while handling the KeyboardInterrupt."""
    out = _copy(tiny, tmp_path)
    before = (out / "last.pt").read_bytes()

    def save(obj, f, *args, **kwargs):
        try:
            f.write(b"PK\x03\x04 part of a zip")
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 51644608 vs 51644496")

    monkeypatch.setattr(checkpoint.torch, "save", save)
    assert main(["--out", str(out), "--resume", "auto", "--epochs", "3", "--no-progress"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("python -m se_surgery.train: interrupted at epoch 3"), err
    assert f"{out / 'last.pt'} holds the end of epoch 2: continue with --resume auto" in err, err
    assert (out / "last.pt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
