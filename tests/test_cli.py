"""The ``mrmeta`` command end to end on real Omniglot, resume after kill -9, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mrmeta import __version__
from mrmeta._factory import build_learner, build_model
from mrmeta.algorithms import algorithm_defaults
from mrmeta.cli import build_parser, config_from_args, main
from mrmeta.config import APPLIES_TO, ConfigError, TrainConfig, is_switch
from mrmeta.evaluate import format_accuracy as _accuracy_text

DATA_ROOT = Path(os.environ.get("MRMETA_DATA") or "/nonexistent/mrmeta-data")
needs_omniglot = pytest.mark.skipif(
    not (DATA_ROOT / "omniglot" / "images_background.npz").exists(),
    reason="no real Omniglot copy in $MRMETA_DATA/omniglot",
)

TINY = [
    "--dataset",
    "omniglot",
    "--data-root",
    str(DATA_ROOT),
    "--ways",
    "3",
    "--shots",
    "1",
    "--queries",
    "2",
    "--meta-batch",
    "2",
    "--hidden",
    "8",
    "--inner-steps",
    "3",
    "--cg-iters",
    "3",
    "--val-every",
    "3",
    "--val-tasks",
    "4",
    "--test-tasks",
    "6",
    "--threads",
    "1",
    "--seed",
    "3",
]


def _tiny_for(algo: str) -> list[str]:
    """TINY without ``--cg-iters`` for the algorithms that have no CG (the CLI refuses it)."""
    if algo in APPLIES_TO["cg_iters"]:
        return [*TINY, "--quiet"]
    at = TINY.index("--cg-iters")
    return [*TINY[:at], *TINY[at + 2 :], "--quiet"]


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def _learner_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "last.pt", weights_only=True)["learner"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.data
@needs_omniglot
def test_train_end_to_end_writes_the_run_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, stdout, err = _run(
        ["train", "--algo", "mrml", *TINY, "--iterations", "6", "--out", str(out), "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert "test accuracy" in stdout
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "result.json"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert len([r for r in records if r["kind"] == "val"]) == 2
    for key in (
        "loss",
        "accuracy",
        "inner_grad_norm",
        "cg_residual",
        "grad_norm",
        "seconds",
        "max_rss_bytes",
    ):
        assert all(r[key] is not None for r in train), key
    assert all(r["cg_breakdowns"] is None for r in train)  # v solved exactly: no CG to break
    result = json.loads((out / "result.json").read_text())
    assert result["test_tasks"] == 6 and 0.0 <= result["test_accuracy"] <= 1.0
    assert json.loads((out / "config.json").read_text())["ways"] == 3


@pytest.mark.data
@needs_omniglot
@pytest.mark.parametrize("algo", ["anil", "itd-bio", "maml", "fomaml", "imaml"])
def test_every_algorithm_trains_from_the_command_line(tmp_path: Path, capsys, algo: str) -> None:
    out = tmp_path / "run"
    code, stdout, err = _run(
        ["train", "--algo", algo, *_tiny_for(algo), "--iterations", "2", "--out", str(out)], capsys
    )
    assert code == 0, err
    assert "test accuracy" in stdout
    saved = json.loads((out / "result.json").read_text())
    assert saved["algo"] == algo and saved["iterations"] == 2


@pytest.mark.data
@needs_omniglot
def test_config_file_and_flags_override(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.toml"
    config.write_text("iterations = 2\nways = 4\nl2 = 0.5\n")
    out = tmp_path / "run"
    code, _, err = _run(
        ["train", *TINY, "--config", str(config), "--ways", "3", "--out", str(out), "--quiet"],
        capsys,
    )
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert (saved["iterations"], saved["ways"], saved["l2"]) == (2, 3, 0.5)


@pytest.mark.data
@needs_omniglot
def test_eval_frozen_backbone(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert _run(["train", *TINY, "--iterations", "2", "--out", str(out), "--quiet"], capsys)[0] == 0
    code, stdout, err = _run(
        ["eval", "--run", str(out), "--tasks", "5", "--protocol", "frozen-backbone"], capsys
    )
    assert code == 0, err
    assert "5 tasks, frozen-backbone" in stdout


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "mrmeta", "train", *args, "--quiet"]


def _wait_for_iterations(metrics: Path, count: int, proc: subprocess.Popen, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if metrics.exists():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if sum(r["kind"] == "train" for r in lines) >= count:
                return
        if proc.poll() is not None:
            pytest.fail(f"training exited early with {proc.returncode}")
        time.sleep(0.05)
    pytest.fail("training did not reach the kill point in time")


@pytest.mark.data
@pytest.mark.slow
@needs_omniglot
def test_resume_after_kill_is_bit_identical(tmp_path: Path) -> None:
    args = [
        *TINY,
        "--iterations",
        "14",
        "--checkpoint-every",
        "1",
        "--warm-start-head",
        "--warm-start-cg",
        "--no-exact-v",
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    reference = tmp_path / "reference"
    subprocess.run(_cli([*args, "--out", str(reference)]), check=True, env=env)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli([*args, "--out", str(killed)]), env=env)
    try:
        _wait_for_iterations(killed / "metrics.jsonl", 6, proc, limit=120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "result.json").exists(), "the run finished before it was killed"
    subprocess.run(_cli(["--out", str(killed), "--resume"]), check=True, env=env)
    ref_state, resumed_state = _learner_state(reference), _learner_state(killed)
    assert ref_state.keys() == resumed_state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], resumed_state[key]), key
    ref_log = (reference / "metrics.jsonl").read_text().splitlines()
    resumed_log = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(ref_log) == len(resumed_log)


BAD_INPUTS = [
    (["--algo", "reptile"], "algo must be one of"),
    (["--dataset", "imagenet-1k"], "imagenet-1k"),
    (["--ways", "5000"], "ways"),
    (["--shots", "15", "--queries", "10"], "shots + queries"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--inner-lr", "inf"], "--inner-lr must be a finite number"),
    (["--data-root", "/nonexistent/mrmeta-data", "--no-download"], "MRMETA_DATA"),
    (["--dataset", "sinusoid"], "--dataset must be one of omniglot, cifar-fs"),
    (["--meta-batch", "0"], "--meta-batch must be an integer >= 1"),
    (["--warm-start-cg"], "--warm-start-cg needs --no-exact-v: it warm-starts CG's N steps"),
]


@pytest.mark.data
@needs_omniglot
@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_without_traceback(tmp_path: Path, capsys, extra, message) -> None:
    out = tmp_path / "run"
    code, _, err = _run(["train", *TINY, "--iterations", "1", *extra, "--out", str(out)], capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("ways = [1, 2", "not valid TOML"),
        ("wayz = 5\n", "run.toml: wayz is not a key"),
        ("ways = 'five'\n", "run.toml: ways must be an integer"),
    ],
)
def test_bad_config_file(tmp_path: Path, capsys, content, message) -> None:
    config = tmp_path / "run.toml"
    if content is not None:
        config.write_text(content)
    out = tmp_path / "run"
    code, _, err = _run(["train", "--config", str(config), "--out", str(out)], capsys)
    assert code == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unreadable_config_file(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.toml"
    config.write_bytes(b"\xff\xfe not text")
    code, _, err = _run(["train", "--config", str(config), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "cannot be read" in err


def test_existing_out_without_resume_is_refused_and_untouched(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "iteration": 1}\n')
    before = _snapshot(out)
    code, _, err = _run(["train", "--out", str(out), "--iterations", "1"], capsys)
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before


def test_resume_without_a_run_is_refused(tmp_path: Path, capsys) -> None:
    code, _, err = _run(["train", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert code == 2 and "no run to resume" in err


def test_eval_without_checkpoint(tmp_path: Path, capsys) -> None:
    code, _, err = _run(["eval", "--run", str(tmp_path)], capsys)
    assert code == 2 and "no checkpoint" in err


@pytest.mark.data
@needs_omniglot
def test_resume_may_extend_a_finished_run_but_not_change_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert _run(["train", *TINY, "--iterations", "2", "--out", str(out), "--quiet"], capsys)[0] == 0
    code, _, err = _run(["train", "--out", str(out), "--resume", "--ways", "4"], capsys)
    assert code == 2 and "cannot change: --ways 3 -> 4" in err
    code, _, err = _run(
        ["train", "--out", str(out), "--resume", "--iterations", "4", "--quiet"], capsys
    )
    assert code == 0, err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert json.loads((out / "result.json").read_text())["iterations"] == 4


def test_out_that_is_a_file_and_queries_zero_are_refused(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "file"
    afile.write_text("keep me")
    code, _, err = _run(["train", "--out", str(afile)], capsys)
    assert code == 2 and "is a file" in err and afile.read_text() == "keep me"
    code, _, err = _run(["train", "--queries", "0", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "--queries must be an integer >= 1" in err


def test_damaged_checkpoint_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    code, _, err = _run(["train", "--out", str(tmp_path), "--resume"], capsys)
    assert code == 2 and "cannot be read" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(["eval", "--run", str(tmp_path), "--checkpoint", "last"], capsys)
    assert code == 2 and "cannot be read" in err


@pytest.mark.data
@needs_omniglot
def test_vinyals_split_from_the_command_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, _, err = _run(
        [
            "train",
            *TINY,
            "--omniglot-split",
            "vinyals",
            "--iterations",
            "1",
            "--out",
            str(out),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["omniglot_split"] == "vinyals"
    code, _, err = _run(["train", *TINY, "--omniglot-split", "mini", "--out", str(out)], capsys)
    assert code == 2 and "--omniglot-split must be one of lake, vinyals" in err


# --------------------------------------------------------------------------- strict config checks
def _wrong_type(name: str, default: object) -> object:
    """A value of the wrong type for field ``name`` (whose default is ``default``)."""
    if isinstance(default, bool):
        return "false"  # a TOML string, not a boolean: it used to count as true
    if isinstance(default, str) or name == "data_root":
        return 5  # data_root = 5 used to give a TypeError traceback
    return "5"  # a string for a number (and for inner_lr, neither a number nor 'auto')


@pytest.mark.parametrize("field", [f for f in TrainConfig.__dataclass_fields__])
def test_every_key_is_type_checked_with_one_line(field: str) -> None:
    value = _wrong_type(field, getattr(TrainConfig(), field))
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({field: value}, source="run.toml")
    assert str(err.value).startswith(f"run.toml: {field} must be ") and "\n" not in str(err.value)
    assert repr(value) in str(err.value)


def test_toml_types_are_checked_strictly_one_line_each(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.toml"
    config.write_text('distributed = "false"\ndownload = "yes"\ndata_root = 5\n')
    out = tmp_path / "run"
    code, _, err = _run(["train", "--config", str(config), "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and not out.exists()
    assert sorted(lines) == [
        f"mrmeta: error: {config}: data_root must be a string; got 5",
        f"mrmeta: error: {config}: distributed must be true or false; got 'false' "
        "(a string: write true or false)",
        f"mrmeta: error: {config}: download must be true or false; got 'yes' "
        "(a string: write true or false)",
    ]


def test_cli_errors_name_the_flags_and_file_errors_the_key(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, _, err = _run(["train", "--time-budget", "0", "--out", str(out)], capsys)
    assert code == 2 and err.strip() == "mrmeta: error: --time-budget must be > 0; got 0.0"
    config = tmp_path / "run.toml"
    config.write_text("time_budget = 0\nmeta-batch = 0\n")
    code, _, err = _run(["train", "--config", str(config), "--out", str(out)], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"mrmeta: error: {config}: meta-batch must be an integer >= 1; got 0",
        f"mrmeta: error: {config}: time_budget must be > 0; got 0",
    ]


def _config(argv: list[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", "--out", "r", *argv]))


def test_options_of_other_algorithms_are_refused_naming_theirs(tmp_path: Path, capsys) -> None:
    argv = ["--algo", "fomaml", "--warm-start-cg", "--learn-head-init", "--reg", "5", "--l2", "3"]
    code, _, err = _run(["train", *argv, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "Traceback" not in err and not (tmp_path / "run").exists()
    assert err.strip().splitlines() == [
        "mrmeta: error: --warm-start-cg applies only to mrml, not to fomaml; remove it",
        "mrmeta: error: --learn-head-init applies only to mrml, not to fomaml; remove it",
        "mrmeta: error: --reg applies only to imaml, not to fomaml; remove it",
        "mrmeta: error: --l2 applies only to mrml and itd-bio, not to fomaml; remove it",
    ]
    config = tmp_path / "run.toml"
    config.write_text('algo = "maml"\ncg_iters = 3\n')
    with pytest.raises(ConfigError, match=rf"^{config}: cg_iters applies only to mrml and imaml"):
        _config(["--config", str(config)])
    with pytest.raises(ConfigError, match="^--no-warm-start-head applies only|^--warm-start-head"):
        _config(["--algo", "anil", "--no-warm-start-head"])  # explicitly set, even to its default


@pytest.mark.parametrize("algo", ["mrml", "maml", "fomaml", "anil", "itd-bio", "imaml"])
def test_options_left_at_their_defaults_are_never_refused(algo: str) -> None:
    assert _config(["--algo", algo]).algo == algo  # l2, reg, warm starts keep their defaults
    for key, algos in APPLIES_TO.items():
        if algo in algos:  # and each option its algorithm has is accepted
            flag = "--" + key.replace("_", "-")
            value = ["gd"] if key == "inner_solver" else [] if is_switch(key) else ["1"]
            also = ["--no-exact-v"] if key == "warm_start_cg" else []  # CG to warm-start
            assert _config(["--algo", algo, flag, *value, *also]).algo == algo


@pytest.mark.parametrize("dataset", ["sinusoid", "imagenet-1k"])
def test_unknown_dataset_offers_only_what_train_can_train(tmp_path: Path, capsys, dataset) -> None:
    code, _, err = _run(["train", "--dataset", dataset, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.strip() == (
        "mrmeta: error: --dataset must be one of omniglot, cifar-fs, fc100, mini-imagenet, "
        f"tiered-imagenet; got {dataset!r}"
    )
    assert _config(["--dataset", "CIFAR_FS"]).dataset == "CIFAR_FS"  # spellings the loader forgives


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"mrmeta {__version__}"


def test_one_task_accuracy_shows_no_confidence_interval() -> None:
    assert (
        _accuracy_text(0.5, 0.0, 1, "native") == "50.00% (1 task: no confidence interval, native)"
    )
    assert _accuracy_text(0.5, 0.01, 600, "native") == "50.00% ± 1.00% (95% CI, 600 tasks, native)"


def test_learner_option_errors_name_the_flag() -> None:
    config = TrainConfig(algo="maml", inner_lr="auto", hidden=8)
    with pytest.raises(ConfigError, match="^--algo maml: --inner-lr must be a number"):
        build_learner(config, build_model(config, (1, 28, 28)))


@pytest.mark.data
@needs_omniglot
def test_a_run_saves_the_values_it_uses_and_resumes_with_them_given_again(
    tmp_path: Path, capsys
) -> None:
    """config.json holds every algorithm option as used (the defaults filled in), so that a
    later version's defaults cannot change a saved run, and giving a default again on
    ``--resume`` is the same setting, not a change."""
    out = tmp_path / "run"
    assert _run(["train", *TINY, "--iterations", "2", "--out", str(out), "--quiet"], capsys)[0] == 0
    saved = json.loads((out / "config.json").read_text())
    defaults = algorithm_defaults("mrml")
    for key in ("inner_solver", "inner_tol", "inner_lr", "l2", "exact_v", "warm_start_cg"):
        assert saved[key] == defaults[key], key
    assert (saved["inner_steps"], saved["cg_iters"], saved["lr"]) == (3, 3, defaults["meta_lr"])
    assert saved["reg"] is None  # iMAML's: not an option of mrml
    again = ["--l2", str(defaults["l2"]), "--exact-v", "--iterations", "3", "--quiet"]
    code, _, err = _run(["train", "--out", str(out), "--resume", *again], capsys)
    assert code == 0, err


@pytest.mark.data
@needs_omniglot
def test_a_run_saved_before_exact_v_existed_resumes_and_tests_with_cg(tmp_path: Path) -> None:
    """Runs written before ``exact_v`` existed solved for v with N CG steps: a checkpoint
    without the key resumes and is tested as it trained (with CG)."""
    config = TrainConfig.from_saved({"algo": "mrml", "cg_iters": 3}, source="old config.json")
    assert config.exact_v is False
    assert TrainConfig.from_saved({"algo": "maml"}, source="x").exact_v is None  # not maml's
    assert TrainConfig.from_saved({"algo": "mrml", "exact_v": True}, source="x").exact_v is True
    out = tmp_path / "run"
    subprocess.run(_cli([*TINY, "--iterations", "2", "--out", str(out)]), check=True)
    for name in ("last.pt", "best.pt"):  # as an old version would have written them
        state = torch.load(out / name, weights_only=False)
        del state["config"]["exact_v"]
        torch.save(state, out / name)
    config_file = json.loads((out / "config.json").read_text())
    del config_file["exact_v"]
    (out / "config.json").write_text(json.dumps(config_file))
    subprocess.run(_cli(["--out", str(out), "--resume", "--iterations", "3"]), check=True)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    third = next(r for r in records if r["kind"] == "train" and r["iteration"] == 3)
    assert third["cg_breakdowns"] is not None  # CG ran: v came from N CG steps, as before
