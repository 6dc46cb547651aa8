"""Fault classes 4 and 7 (docs/reliability.md): output paths, result files, resume keys.

A bad ``--out`` fails before training; a write that fails after training is rescued; a
result file that parses but is no result is moved aside and its run redone; two compares
cannot share a folder; finished runs are reused only with the same version and threads.
"""

import errno
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

import kronfisher
import kronfisher.data as data
from kronfisher.bench import compare as compare_mod
from kronfisher.bench import io as io_mod
from kronfisher.bench.lock import LOCK_NAME, FolderLockedError, folder_lock
from kronfisher.cli import main


@pytest.fixture
def tiny_curves(monkeypatch):
    sets = {"train": data.make_curves(96, seed=1), "test": data.make_curves(32, seed=2)}
    monkeypatch.setattr(data, "load_dataset", lambda name, split="train", **kw: sets[split])
    return sets


def _quick_train(cfg, train_data, test_data, **kw):
    """A stand-in for runner.train with the same record layout (the real one is covered
    by test_cli.py and by the train tests here); keeps these tests fast."""
    row = {"epoch": 1.0, "step": 3, "wall_time": 0.01, "train_loss": 2.0 + len(cfg.optimizer),
           "train_loss_pixel": 0.5, "test_loss": 2.5, "test_loss_pixel": 0.6}
    return {"config": asdict(cfg), "status": "complete", "history": [dict(row, epoch=0.0), row],
            "final": row, "torch_threads": torch.get_num_threads()}


@pytest.fixture
def count_train(monkeypatch):
    """compare's training replaced by a fast stand-in that records which runs it did."""
    calls = []

    def counting(cfg, *a, **k):
        calls.append(cfg.optimizer)
        return _quick_train(cfg, *a, **k)

    monkeypatch.setattr(compare_mod, "train", counting)
    monkeypatch.setattr(compare_mod, "plot_runs", lambda results, out: [])
    return calls


def _compare_argv(out, optimizers="sgd,adam"):
    return ["compare", "--optimizers", optimizers, "--epochs", "1", "--batch-size", "32",
            "--out", str(out), "--no-progress"]


def _train_argv(out):
    return ["train", "--optimizer", "sgd", "--epochs", "1", "--batch-size", "32",
            "--out", str(out), "--no-progress"]


def _no_training(monkeypatch):
    import kronfisher.bench.runner as runner

    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("trained anyway"))


# ------------------------------------------------------------------ output paths
def test_train_out_that_is_a_file_fails_before_training(tiny_curves, tmp_path, monkeypatch,
                                                        capsys):
    target = tmp_path / "results.json"
    target.write_text("keep me")
    _no_training(monkeypatch)
    assert main(_train_argv(target)) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("command", [_train_argv, _compare_argv])
def test_out_below_a_file_fails_before_training(tiny_curves, tmp_path, monkeypatch, capsys,
                                                command):
    (tmp_path / "file").write_text("")
    _no_training(monkeypatch)
    monkeypatch.setattr(compare_mod, "train", lambda *a, **k: pytest.fail("trained anyway"))
    assert main(command(tmp_path / "file" / "sub")) == 2
    assert "cannot create output folder" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions and a non-root user")
@pytest.mark.parametrize("command", [_train_argv, _compare_argv])
def test_unwritable_out_fails_before_training(tiny_curves, tmp_path, monkeypatch, capsys,
                                              command):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    _no_training(monkeypatch)
    monkeypatch.setattr(compare_mod, "train", lambda *a, **k: pytest.fail("trained anyway"))
    try:
        assert main(command(locked / "sub")) == 2
    finally:
        locked.chmod(0o700)
    assert "cannot create output folder" in capsys.readouterr().err


def _fail_writes_into(monkeypatch, folder):
    """Every atomic write into ``folder`` fails as on a full disk (the probe passed)."""
    real = io_mod.atomic_write_text

    def full_disk(path, text):
        if os.path.dirname(os.path.abspath(path)).startswith(str(folder)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(io_mod, "atomic_write_text", full_disk)


def test_train_result_is_rescued_when_the_disk_fills_up(tiny_curves, tmp_path, monkeypatch,
                                                        capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(io_mod.tempfile, "tempdir", str(tmp_path / "tmp"))
    _fail_writes_into(monkeypatch, out)
    assert main(_train_argv(out)) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "saved it to" in err
    rescued = list((tmp_path / "tmp").glob("kronfisher-rescue-*/run.json"))
    assert len(rescued) == 1
    rec = json.loads(rescued[0].read_text())
    assert rec["status"] == "complete" and rec["config"]["optimizer"] == "sgd"
    assert not (out / "run.json").exists()


def test_compare_results_are_rescued_and_reported(tiny_curves, tmp_path, monkeypatch, capsys,
                                                  count_train):
    out = tmp_path / "cmp"
    monkeypatch.setattr(io_mod.tempfile, "tempdir", str(tmp_path / "tmp"))
    _fail_writes_into(monkeypatch, out / "runs")
    assert main(_compare_argv(out, "sgd")) == 1
    assert "sgd.json" in capsys.readouterr().err
    (rescued,) = (tmp_path / "tmp").glob("kronfisher-rescue-*/sgd.json")
    assert json.loads(rescued.read_text())["final"]["train_loss"] == 5.0
    assert (out / "summary.md").exists()  # what could be written was
    assert not (out / LOCK_NAME).exists()


def test_train_into_a_folder_with_an_earlier_run_keeps_it(tiny_curves, tmp_path, monkeypatch,
                                                          capsys):
    import kronfisher.bench.runner as runner

    monkeypatch.setattr(runner, "train", _quick_train)
    assert main(_train_argv(tmp_path)) == 0
    first = (tmp_path / "run.json").read_text()
    assert main(_train_argv(tmp_path)) == 0
    assert "kept the earlier run.json as run.json.old-" in capsys.readouterr().out
    (old,) = tmp_path.glob("run.json.old-*")
    assert old.read_text() == first
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "complete"


def test_save_text_prints_when_no_file_can_be_written(tmp_path, monkeypatch, capsys):
    def never(path, text):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io_mod, "atomic_write_text", never)
    assert io_mod.save_text(tmp_path / "r.json", '{"final": 1}\n') is None
    captured = capsys.readouterr()
    assert '{"final": 1}' in captured.out and "Read-only file system" in captured.err


def test_result_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        io_mod.write_json(tmp_path / "a.json", {"x": 1})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
        os.umask(0o022)
        io_mod.write_csv(tmp_path / "b.csv", [{"x": 1}])
        assert (tmp_path / "b.csv").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


# ------------------------------------------------------------- corrupt results
CORRUPT = {
    "null": b"null",
    "list": b"[]",
    "not-utf8": b"\xff\xfe\x00{",
    "truncated": b'{"final": {"epoch": 1.0',
    "no-final": b'{"status": "complete", "history": []}',
    "empty": b"",
}


@pytest.mark.parametrize("kind", [*CORRUPT, "directory"])
def test_corrupt_result_file_is_moved_aside_and_rerun(tiny_curves, tmp_path, count_train,
                                                      capsys, kind):
    out = tmp_path / "cmp"
    assert main(_compare_argv(out)) == 0
    good = json.loads((out / "runs" / "adam.json").read_text())
    bad = out / "runs" / "sgd.json"
    bad.unlink()
    if kind == "directory":
        bad.mkdir()
    else:
        bad.write_bytes(CORRUPT[kind])
    count_train.clear()
    capsys.readouterr()
    assert main(_compare_argv(out)) == 0
    assert count_train == ["sgd"]  # adam kept, sgd redone
    text = capsys.readouterr().out
    assert "[sgd]" in text and "not a usable result" in text
    (aside,) = (out / "runs").glob("sgd.json.corrupt-*")
    if kind != "directory":
        assert aside.read_bytes() == CORRUPT[kind]  # kept for inspection, not deleted
    assert json.loads(bad.read_text())["status"] == "complete"
    assert json.loads((out / "runs" / "adam.json").read_text()) == good


# ------------------------------------------------------------------ resume keys
@pytest.mark.parametrize("field, value, said", [
    ("kronfisher_version", "0.0.1", "kronfisher 0.0.1"),
    ("torch_threads", 977, "977 torch threads"),
])
def test_finished_run_from_other_version_or_threads_is_not_reused(
        tiny_curves, tmp_path, count_train, capsys, field, value, said):
    out = tmp_path / "cmp"
    assert main(_compare_argv(out, "sgd")) == 0
    path = out / "runs" / "sgd.json"
    rec = json.loads(path.read_text())
    assert rec["kronfisher_version"] == kronfisher.__version__
    assert rec["torch_threads"] == torch.get_num_threads()
    rec[field] = value
    path.write_text(json.dumps(rec))
    count_train.clear()
    capsys.readouterr()
    assert main(_compare_argv(out, "sgd")) == 0
    assert count_train == ["sgd"]
    assert said in capsys.readouterr().out
    assert len(list((out / "runs").glob("sgd.json.old-*"))) == 1


# ----------------------------------------------------------- concurrent compare
_HOLDER = """
import sys, time
from kronfisher.bench.lock import folder_lock
with folder_lock(sys.argv[1], what="kronfisher compare", echo=lambda m: None):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_compare_on_a_folder_is_refused_while_the_first_runs(tiny_curves, tmp_path,
                                                                    count_train, capsys):
    out = tmp_path / "cmp"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_compare_argv(out)) == 2
        err = capsys.readouterr().err
        assert f"PID {holder.pid}" in err and "in use by another kronfisher compare" in err
        assert count_train == []
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and taken over
    assert (out / LOCK_NAME).exists()
    assert main(_compare_argv(out)) == 0
    assert f"stale lock {out / LOCK_NAME} of PID {holder.pid}" in capsys.readouterr().out
    assert count_train == ["sgd", "adam"]
    assert not (out / LOCK_NAME).exists()


def test_lock_of_another_host_is_refused_with_instructions(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": 1, "host": "elsewhere.example", "started": time.time(), "what": "x"}))
    with pytest.raises(FolderLockedError, match="elsewhere.example.*delete"):
        with folder_lock(tmp_path):
            pass


def test_unreadable_old_lock_is_taken_over(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text("garbage")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    said = []
    with folder_lock(tmp_path, echo=said.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "unreadable" in said[0] and not lock.exists()


# ------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_says_what_was_kept_and_exits_130(tiny_curves, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"

    def interrupted(cfg, *a, **k):
        if cfg.optimizer == "adam":
            raise KeyboardInterrupt
        return _quick_train(cfg, *a, **k)

    monkeypatch.setattr(compare_mod, "train", interrupted)
    assert main(_compare_argv(out)) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "kept in" in err and ": sgd;" in err
    assert "Rerun the same command to resume" in err
    assert not (out / LOCK_NAME).exists()


def test_load_result_says_why_a_file_is_not_a_record(tmp_path):
    from kronfisher.bench.compare import LoadedResult, load_result

    (tmp_path / "folder.json").mkdir()
    assert load_result(tmp_path / "folder.json") == LoadedResult(None, "it is a folder")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    got = load_result(bad)
    assert got.record is None and got.why is not None and "JSON array" in got.why
    rec = {"final": {k: 1.0 for k in ("epoch", "step", "wall_time", "train_loss",
                                       "train_loss_pixel", "test_loss", "test_loss_pixel")},
           "history": [{"epoch": 1.0}], "status": "complete", "config": {}}
    good = tmp_path / "good.json"
    good.write_text(json.dumps(rec))
    assert load_result(good) == LoadedResult(rec, None)
