"""The run folder under misuse and faults: resume with the same command, the folder lock, the
run identity, the data root, unwritable folders, out of memory, stranded and torn folders,
SIGTERM, and what ``eval`` says it tested."""

from __future__ import annotations

import ast
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mrmeta.config
import mrmeta.data
from mrmeta import errors
from mrmeta._run_eval import evaluate_run
from mrmeta._run_folder import nonfinite_tensors
from mrmeta.cli import main
from mrmeta.train import TrainingRun

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_omniglot = pytest.mark.skipif(
    not (DATA_ROOT / "omniglot" / "images_background.npz").exists(),
    reason="real Omniglot copy not found",
)
SRC = Path(__file__).resolve().parents[1] / "src"

# The small run of the issue: a few seconds on one CPU thread.
SMALL = [
    "--iterations",
    "2",
    "--meta-batch",
    "2",
    "--queries",
    "1",
    "--val-tasks",
    "2",
    "--test-tasks",
    "2",
    "--hidden",
    "8",
    "--inner-steps",
    "5",
    "--cg-iters",
    "2",
    "--threads",
    "1",
]
DATA = ["--data-root", str(DATA_ROOT)]


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _train_iterations(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r["iteration"] for r in map(json.loads, lines) if r["kind"] == "train"]


def _for_algo(args: list[str], extra: tuple[str, ...]) -> list[str]:
    """``args`` without ``--cg-iters N`` when ``extra`` picks an algorithm without CG."""
    if "--algo" not in extra or extra[extra.index("--algo") + 1] in ("mrml", "imaml"):
        return args
    i = args.index("--cg-iters")
    return args[:i] + args[i + 2 :]


def _new_run(folder: Path, capsys, *extra: str) -> None:
    argv = ["train", *_for_algo(SMALL, extra), *DATA, *extra, "--out", folder, "--quiet"]
    code, _, err = _run(argv, capsys)
    assert code == 0, err


# ---------------------------------------------------------------- errors and layering
def test_one_base_class_and_the_old_names_still_import() -> None:
    for cls in (errors.ConfigError, errors.DataError, errors.CheckpointError):
        assert issubclass(cls, errors.MrmetaError)
    assert mrmeta.config.ConfigError is errors.ConfigError
    assert mrmeta.data.DataError is errors.DataError
    assert issubclass(mrmeta.data.DataNotFoundError, FileNotFoundError)


@pytest.mark.parametrize("module", ["evaluate.py", "distributed.py", "_checkpoint.py"])
def test_library_modules_do_not_import_the_config_layer(module: str) -> None:
    tree = ast.parse((SRC / "mrmeta" / module).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "mrmeta.config" not in imported


def test_a_damaged_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    from mrmeta._checkpoint import load_checkpoint

    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(errors.CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "last.pt")


# ---------------------------------------------------------------- 1, 7: resume
@pytest.mark.data
@needs_omniglot
def test_resume_with_the_same_command_is_accepted(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    _new_run(out, capsys, "--algo", "mrml", "--seed", "4")
    same = ["train", *SMALL, *DATA, "--algo", "mrml", "--seed", "4", "--out", out, "--quiet"]
    code, _, err = _run([*same, "--resume", "--iterations", "3"], capsys)
    assert code == 0, err
    assert _train_iterations(out) == [1, 2, 3]


@pytest.mark.data
@needs_omniglot
def test_resume_names_every_changed_flag_with_both_values(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    _new_run(out, capsys)
    before = _snapshot(out)
    code, _, err = _run(
        ["train", *SMALL, "--out", out, "--resume", "--ways", "4", "--algo", "anil"], capsys
    )
    assert code == 2 and _one_line(err)
    assert "--ways 5 -> 4" in err and "--algo 'mrml' -> 'anil'" in err
    assert "--meta-batch" not in err.split("(only")[0]  # given again unchanged: not blamed
    assert _snapshot(out) == before


@pytest.mark.data
@needs_omniglot
def test_resume_with_a_config_file_follows_the_same_rule(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    _new_run(out, capsys)
    same, changed = tmp_path / "same.toml", tmp_path / "changed.toml"
    same.write_text("meta_batch = 2\nhidden = 8\niterations = 3\n")
    changed.write_text("hidden = 16\n")
    code, _, err = _run(["train", "--out", out, "--resume", "--config", changed], capsys)
    assert code == 2 and "--hidden 8 -> 16" in err and _one_line(err)
    code, _, err = _run(["train", "--out", out, "--resume", "--config", same, "--quiet"], capsys)
    assert code == 0, err
    assert _train_iterations(out) == [1, 2, 3]  # iterations = 3 from the file was applied


# ---------------------------------------------------------------- 2: the lock
def _hold_lock(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / ".lock").open("a+")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


@pytest.mark.data
@needs_omniglot
def test_a_locked_folder_is_refused_for_a_new_run_and_a_resume(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    _new_run(out, capsys)
    before = _snapshot(out)
    handle = _hold_lock(out)  # another run holds the folder
    try:
        code, _, err = _run(["train", "--out", out, "--resume", "--iterations", "3"], capsys)
        assert code == 2 and "in use by another mrmeta run" in err and str(out) in err
        assert _one_line(err)
        empty = tmp_path / "empty"
        other = _hold_lock(empty)
        try:
            code, _, err = _run(["train", *SMALL, *DATA, "--out", empty], capsys)
        finally:
            other.close()
        assert code == 2 and "in use" in err and str(empty) in err
    finally:
        handle.close()
    assert _snapshot(out) == before
    code, _, err = _run(["train", "--out", out, "--resume", "--iterations", "3", "--quiet"], capsys)
    assert code == 0, err  # the lock went with its holder


@pytest.mark.data
@needs_omniglot
def test_a_run_holds_its_lock_while_it_trains(tmp_path: Path, capsys, monkeypatch) -> None:
    out, seen = tmp_path / "run", []
    original = TrainingRun.step

    def step(self: TrainingRun) -> dict:
        with (out / ".lock").open("a+") as probe:
            try:
                fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("locked")
        return original(self)

    monkeypatch.setattr(TrainingRun, "step", step)
    _new_run(out, capsys)
    assert seen == ["locked", "locked"]


# ---------------------------------------------------------------- 3: run identity
@pytest.mark.data
@needs_omniglot
def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path, capsys) -> None:
    mine, theirs = tmp_path / "mrml", tmp_path / "anil"
    _new_run(mine, capsys)
    _new_run(theirs, capsys, "--algo", "anil")
    run_id = json.loads((mine / "run.json").read_text())["run_id"]
    assert torch.load(mine / "last.pt", weights_only=True)["run_id"] == run_id
    assert torch.load(mine / "best.pt", weights_only=True)["run_id"] == run_id
    shutil.copy(theirs / "last.pt", mine / "last.pt")
    shutil.copy(theirs / "best.pt", mine / "best.pt")
    before = _snapshot(mine)
    code, _, err = _run(["train", "--out", mine, "--resume", "--iterations", "3"], capsys)
    assert code == 2 and "belongs to another run" in err and _one_line(err)
    code, _, err = _run(["eval", "--run", mine, "--tasks", "2"], capsys)
    assert code == 2 and "belongs to another run" in err and _one_line(err)
    assert _snapshot(mine) == before


# ---------------------------------------------------------------- 4: the data root
@pytest.mark.data
@needs_omniglot
def test_a_relative_data_root_is_stored_absolute_and_can_be_pointed_again(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    (tmp_path / "data").symlink_to(DATA_ROOT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MRMETA_DATA", raising=False)
    _new_run(Path("run"), capsys, "--data-root", "data")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data_root"]
    assert saved == str(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = _run(["eval", "--run", tmp_path / "run", "--tasks", "2", "--quiet"], capsys)
    assert code == 0, err
    (tmp_path / "data").unlink()  # the data moved: point at it again
    code, _, err = _run(["eval", "--run", tmp_path / "run", "--tasks", "2"], capsys)
    assert code == 2 and "MRMETA_DATA" in err and _one_line(err)
    code, _, err = _run(
        ["eval", "--run", tmp_path / "run", "--tasks", "2", "--data-root", DATA_ROOT], capsys
    )
    assert code == 0, err
    monkeypatch.setenv("MRMETA_DATA", str(DATA_ROOT))
    code, _, err = _run(["eval", "--run", tmp_path / "run", "--tasks", "2", "--quiet"], capsys)
    assert code == 0, err
    resume = ["train", "--out", tmp_path / "run", "--resume", "--iterations", "3", "--quiet"]
    code, _, err = _run([*resume, "--data-root", DATA_ROOT], capsys)
    assert code == 0, err


# ---------------------------------------------------------------- 9: unwritable folders
def test_an_out_below_a_file_is_refused_before_any_data_is_read(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    bogus = ["--data-root", tmp_path / "no-data-here"]  # data loading would fail differently
    code, _, err = _run(["train", *SMALL, *bogus, "--out", afile / "sub"], capsys)
    assert code == 2 and "cannot be created or written" in err and str(afile / "sub") in err
    assert _one_line(err) and afile.read_text() == "keep me"


@pytest.mark.data
@needs_omniglot
def test_a_failed_write_names_the_file_and_keeps_the_last_checkpoint(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import mrmeta._run_folder as run_folder

    original, calls = run_folder.save_checkpoint, []

    def save(path: Path, state: dict) -> None:
        calls.append(path.name)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(path, state)

    monkeypatch.setattr(run_folder, "save_checkpoint", save)
    out = tmp_path / "run"
    code, _, err = _run(
        ["train", *SMALL, *DATA, "--checkpoint-every", "1", "--out", out, "--quiet"], capsys
    )
    assert code == 1 and _one_line(err)
    assert f"cannot write {out / 'last.pt'} (No space left on device)" in err
    assert "(iteration 0) is intact" in err
    assert torch.load(out / "last.pt", weights_only=True)["progress"]["iteration"] == 0


# ---------------------------------------------------------------- 10: out of memory
@pytest.mark.data
@needs_omniglot
def test_a_huge_meta_batch_is_one_line_and_leaves_no_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    huge = ["--meta-batch", "1000000000"]
    code, _, err = _run(["train", *SMALL, *DATA, *huge, "--out", out, "--quiet"], capsys)
    assert code == 1 and "--meta-batch 1000000000 needs at least" in err and _one_line(err)
    assert not out.exists()
    _new_run(out, capsys)  # the same command with a batch that fits


@pytest.mark.data
@needs_omniglot
def test_an_allocation_failure_in_a_step_is_one_line_and_leaves_no_folder(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    def out_of_memory(self: TrainingRun, sampler, tasks: int):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(TrainingRun, "_draw", out_of_memory)
    out = tmp_path / "run"
    code, _, err = _run(["train", *SMALL, *DATA, "--out", out, "--quiet"], capsys)
    assert code == 1 and "out of memory at iteration 1" in err and "--meta-batch" in err
    assert _one_line(err) and not out.exists()


# ---------------------------------------------------------------- 5 (loop): non-finite
@pytest.mark.data
@needs_omniglot
def test_a_checkpoint_with_non_finite_parameters_is_never_written(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    original = TrainingRun.step

    def poisoned(self: TrainingRun) -> dict:
        record = original(self)
        with torch.no_grad():
            next(iter(self.learner.meta_parameters())).fill_(float("nan"))
        return record

    monkeypatch.setattr(TrainingRun, "step", poisoned)
    out = tmp_path / "run"
    code, _, err = _run(
        ["train", *SMALL, *DATA, "--checkpoint-every", "1", "--out", out, "--quiet"], capsys
    )
    assert code == 1 and "non-finite at iteration 1" in err and _one_line(err)
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            state = torch.load(out / name, weights_only=True)["learner"]
            assert nonfinite_tensors(state) == [], name
    assert torch.load(out / "last.pt", weights_only=True)["progress"]["iteration"] == 0


# ---------------------------------------------------------------- 11, 12: stranded, torn
def _strand(folder: Path) -> None:
    """The folder of a run killed between config.json and its first last.pt."""
    for name in ("last.pt", "best.pt", "result.json", "curves.png", "metrics.jsonl"):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "tensorboard", ignore_errors=True)


@pytest.mark.data
@needs_omniglot
def test_a_folder_without_a_checkpoint_can_be_resumed_or_restarted(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    _new_run(out, capsys)
    _strand(out)
    (out / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # killed mid-write
    code, _, err = _run(["train", "--out", out, "--resume", "--quiet"], capsys)
    assert code == 0, err
    assert _train_iterations(out) == [1, 2]
    _strand(out)
    (out / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    _new_run(out, capsys, "--seed", "5")  # or overwrite it with a new run
    assert json.loads((out / "config.json").read_text())["seed"] == 5
    assert _train_iterations(out) == [1, 2]


@pytest.mark.data
@needs_omniglot
def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    _new_run(out, capsys)
    with (out / "metrics.jsonl").open("a") as log:
        log.write('{"kind": "train", "itera')
    code, _, err = _run(["train", "--out", out, "--resume", "--iterations", "3", "--quiet"], capsys)
    assert code == 0, err
    assert _train_iterations(out) == [1, 2, 3]


# ---------------------------------------------------------------- 13: SIGINT, SIGTERM
@pytest.mark.data
@needs_omniglot
def test_sigint_says_where_it_stopped_and_names_the_folder(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    original = TrainingRun.step

    def interrupted(self: TrainingRun) -> dict:
        if self.progress.iteration == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(TrainingRun, "step", interrupted)
    out = tmp_path / "run"
    every = ["--checkpoint-every", "1"]
    code, _, err = _run(["train", *SMALL, *DATA, *every, "--out", out, "--quiet"], capsys)
    assert code == 130 and _one_line(err)
    assert "stopped by SIGINT at iteration 1" in err and "(iteration 1) is intact" in err
    assert f"mrmeta train --out {out} --resume" in err and "DIR" not in err


@pytest.mark.data
@needs_omniglot
def test_sigterm_is_handled_like_sigint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "mrmeta", "train", *SMALL, *DATA, "--iterations", "500"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [*command, "--out", str(out), "--quiet"], env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "stopped by SIGTERM at iteration" in err and f"--out {out} --resume" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- 15: eval
@pytest.mark.data
@needs_omniglot
def test_eval_says_which_checkpoint_it_tested(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    _new_run(out, capsys)
    code, stdout, err = _run(["eval", "--run", out, "--tasks", "2"], capsys)
    assert code == 0, err
    assert f"tested {out / 'best.pt'} (iteration 2, best validation accuracy)" in stdout
    assert "2/2" in err  # the progress bar
    (out / "best.pt").unlink()
    code, stdout, err = _run(["eval", "--run", out, "--tasks", "2", "--quiet"], capsys)
    assert code == 0, err
    assert f"tested {out / 'last.pt'} (iteration 2, no best.pt: no validation yet)" in stdout


@pytest.mark.data
@needs_omniglot
def test_evaluate_run_touches_no_global_state_and_matches_the_final_test(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    _new_run(out, capsys)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    try:
        result = evaluate_run(out, tasks=2)
        assert torch.get_num_threads() == 2
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((out / "result.json").read_text())
    assert result.mean == saved["test_accuracy"] and result.checkpoint is not None


@pytest.mark.data
@needs_omniglot
def test_an_interrupt_while_loading_data_leaves_a_folder_the_same_command_reuses(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import mrmeta.train as train_module

    def interrupted(config, split: str):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "load_split", interrupted)
        code, _, err = _run(["train", *SMALL, *DATA, "--out", out, "--quiet"], capsys)
    assert code == 130 and "nothing was trained: run the same command again" in err
    _new_run(out, capsys)


def test_nonfinite_tensors_names_each_bad_tensor() -> None:
    tree = {
        "a": torch.tensor([1.0, float("nan")]),
        "b": {"c": torch.tensor([float("inf")]), "d": torch.tensor([2])},
        "e": [torch.zeros(2), "text"],
    }
    assert nonfinite_tensors(tree) == ["a", "b.c"]


def test_a_checkpoint_holding_objects_is_refused_without_unsafe_advice(tmp_path: Path) -> None:
    import pathlib

    from mrmeta._checkpoint import load_checkpoint
    from mrmeta.errors import CheckpointError

    path = tmp_path / "last.pt"
    torch.save({"x": pathlib.PurePosixPath("a")}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "weights_only" not in str(err.value) and "refused without running" in str(err.value)
    assert "\n" not in str(err.value)


def test_one_task_evaluation_shows_no_interval() -> None:
    from mrmeta.evaluate import EvalResult

    one = EvalResult.from_accuracies(torch.tensor([0.5]), "native")
    assert "±" not in str(one) and "1 task: no confidence interval" in str(one)
    assert "± " in str(EvalResult.from_accuracies(torch.tensor([0.5, 0.7]), "native"))
