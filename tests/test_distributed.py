"""Distributed training: helpers over a real 2-process gloo group, 2 ranks under torchrun against
one process computing the same tasks (float64), a rank killed or hung mid-run, and --resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mrmeta._factory import build_learner, build_model
from mrmeta.cli import main
from mrmeta.config import ALGORITHMS, APPLIES_TO, ConfigError, TrainConfig
from mrmeta.distributed import (
    DistContext,
    average_gradients,
    broadcast_module,
    check_on_main,
    gather_rows,
    gather_to_main,
    rank_seed,
    shard_size,
    to_cpu,
)
from mrmeta.tasks import TaskBatch
from mrmeta.train import TrainingRun

DATA_ROOT = Path(os.environ.get("MRMETA_DATA") or "/nonexistent/mrmeta-data")
needs_omniglot = pytest.mark.skipif(
    not (DATA_ROOT / "omniglot" / "images_background.npz").exists(),
    reason="no real Omniglot copy in $MRMETA_DATA/omniglot",
)
needs_proc = pytest.mark.skipif(
    not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc"
)

TINY = TrainConfig(
    dataset="omniglot",
    data_root=str(DATA_ROOT),
    ways=3,
    shots=1,
    queries=2,
    meta_batch=4,
    hidden=8,
    inner_steps=3,
    cg_iters=3,
    val_every=20,
    val_tasks=4,
    test_tasks=6,
    threads=1,
    seed=3,
)
LAUNCH_BOUND = 90.0  # seconds a launch may take to exit after a rank was killed (startup excluded)


# --------------------------------------------------------------------------- fast unit tests
def test_rank_seeds_differ_and_rank_zero_is_the_one_process_stream() -> None:
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, r) for r in range(8)}) == 8


def test_shard_size_divides_the_meta_batch_or_says_how_to_fix_it() -> None:
    assert shard_size(16, 4) == 4 and shard_size(5, 1) == 5
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        shard_size(16, 3)


def test_to_cpu_keeps_the_structure() -> None:
    tree = {"a": [torch.ones(2), (torch.zeros(1), 3)], "b": None}
    moved = to_cpu(tree)
    assert moved["a"][1][1] == 3 and moved["b"] is None
    assert isinstance(moved["a"][1], tuple) and torch.equal(moved["a"][0], torch.ones(2))


def test_single_process_helpers_are_no_ops() -> None:
    ctx = DistContext()
    param = nn.Parameter(torch.ones(2))
    param.grad = torch.full((2,), 3.0)
    average_gradients([param], ctx)
    assert torch.equal(param.grad, torch.full((2,), 3.0))
    assert gather_rows([1.0, 2.0], ctx).tolist() == [[1.0, 2.0]]
    assert gather_to_main({"x": 1}, ctx) == [{"x": 1}]


def test_config_checks_dtype_and_timeout() -> None:
    with pytest.raises(ConfigError, match="dtype must be one of float32, float64"):
        TrainConfig(dtype="float16")
    with pytest.raises(ConfigError, match="dist_timeout must be > 0"):
        TrainConfig(dist_timeout=0)


def test_distributed_without_torchrun_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    code = main(["train", "--distributed", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "torchrun --nproc_per_node" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_several_processes_without_the_flag_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["train", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "add --distributed" in err and not (tmp_path / "run").exists()


_EXIT_CHILD = """
import atexit, sys
from mrmeta import distributed
atexit.register(lambda: print("teardown ran", flush=True))
distributed._joined_process_group = {joined}
print("result written", end="")
distributed.exit_process(3)
"""


@pytest.mark.parametrize("joined", [False, True])
def test_exit_process_skips_the_teardown_only_after_joining_a_group(joined: bool) -> None:
    """A rank that joined a process group leaves with its status and its output flushed, but
    without the interpreter's teardown (atexit handlers stand for it here); any other process
    exits normally."""
    child = _EXIT_CHILD.format(joined=joined)
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, env=buffered
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("result written")
    assert ("teardown ran" in done.stdout) is not joined


# --------------------------------------------------------------------------- real gloo group
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _helpers_worker(rank: int, port: int) -> None:
    """Rank ``rank`` of a 2-process gloo group: every helper against its expected result."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = DistContext(rank, 2, rank, True, torch.device("cpu"), 30.0)
    try:
        _check_average_gradients(ctx)
        assert gather_rows([float(rank), 10.0 * rank], ctx).tolist() == [[0, 0], [1, 10]]
        gathered = gather_to_main({"rank": rank}, ctx)
        assert gathered == ([{"rank": 0}, {"rank": 1}] if rank == 0 else None)
        _check_broadcast_and_shared_error(ctx)
    finally:
        dist.destroy_process_group()


def _check_average_gradients(ctx: DistContext) -> None:
    both = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    one = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    unused = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    both.grad = torch.full((2, 3), float(ctx.rank + 1), dtype=torch.float64)
    one.grad = torch.full((4,), 4.0, dtype=torch.float64) if ctx.rank == 1 else None
    average_gradients([both, one, unused], ctx)
    assert torch.equal(both.grad, torch.full((2, 3), 1.5, dtype=torch.float64))
    assert torch.equal(one.grad, torch.full((4,), 2.0, dtype=torch.float64))  # None = zeros
    assert unused.grad is None  # no gradient anywhere: the optimizer still skips it


def _check_broadcast_and_shared_error(ctx: DistContext) -> None:
    torch.manual_seed(ctx.rank)  # different initialisations on purpose
    module = nn.Linear(3, 2)
    broadcast_module(module, ctx)
    torch.manual_seed(0)
    assert torch.equal(module.weight, nn.Linear(3, 2).weight)

    def fails_on_rank_zero() -> None:
        if ctx.rank == 0:
            raise ConfigError("--out exists")

    try:
        check_on_main(fails_on_rank_zero, ctx)
    except ConfigError as err:
        assert str(err) == "--out exists"
    else:
        raise AssertionError("rank 0's ConfigError was not raised on every rank")


@pytest.mark.slow
def test_helpers_on_a_real_two_process_gloo_group() -> None:
    mp.spawn(_helpers_worker, args=(_free_port(),), nprocs=2, join=True)


def _random_tasks(tasks: int) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3)
    return TaskBatch(
        torch.rand(tasks, 3, 1, 28, 28, generator=g, dtype=torch.float64),
        labels.repeat(tasks, 1),
        torch.rand(tasks, 6, 1, 28, 28, generator=g, dtype=torch.float64),
        labels.repeat(tasks, 2),
    )


def _float64_learner(algo: str) -> nn.Module:
    torch.manual_seed(0)
    config = TINY.replace(algo=algo)
    return build_learner(config, build_model(config, (1, 28, 28))).double()


def _sharded_gradient_worker(rank: int, port: int, algos: list[str]) -> None:
    """Each rank: half the tasks, then the all-reduce; against one learner on all of them."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = DistContext(rank, 2, rank, True, torch.device("cpu"), 30.0)
    tasks = _random_tasks(4)
    try:
        for algo in algos:
            sharded, whole = _float64_learner(algo), _float64_learner(algo)
            sharded.compute_meta_gradient(tasks.slice(2 * rank, 2 * rank + 2))
            average_gradients(sharded.meta_parameters(), ctx)
            whole.compute_meta_gradient(tasks)
            for mine, full in zip(sharded.meta_parameters(), whole.meta_parameters(), strict=True):
                assert (mine.grad is None) == (full.grad is None), algo
                if full.grad is not None:  # float64: summation order only, 1e-12 relative
                    torch.testing.assert_close(mine.grad, full.grad, rtol=1e-12, atol=1e-14)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_meta_gradient_equals_the_whole_batch_for_every_algorithm() -> None:
    mp.spawn(_sharded_gradient_worker, args=(_free_port(), list(ALGORITHMS)), nprocs=2, join=True)


# --------------------------------------------------------------------------- torchrun launches
def _toml(config: TrainConfig) -> str:
    """The config as TOML, without the keys its algorithm has not (the CLI refuses those)."""
    lines = []
    for key, value in config.to_dict().items():
        if value is not None and config.algo in APPLIES_TO.get(key, (config.algo,)):
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "mrmeta",
        "train",
        *args,
        "--quiet",
    ]


def _launch(config: TrainConfig, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    path = out.parent / f"{out.name}.toml"
    path.write_text(_toml(config))
    return _torchrun(2, ["--config", str(path), "--out", str(out), *extra])


def _run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _learner_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "last.pt", weights_only=True)["learner"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


class _UnionSampler:
    """Test-only: each step draws every rank's share from that rank's own sampler and
    concatenates them in rank order — exactly the tasks the ranks draw between them."""

    def __init__(self, run: TrainingRun, world: int) -> None:
        seed = run.config.seed
        self.samplers = [run._sampler("train", rank_seed(seed, r)) for r in range(world)]

    def sample(self, tasks: int) -> TaskBatch:
        parts = [s.sample(tasks // len(self.samplers)) for s in self.samplers]
        fields = zip(*(p.fields() for p in parts), strict=True)
        return TaskBatch(*(torch.cat(field) for field in fields))


def _one_process_reference(
    config: TrainConfig, folder: Path, world: int
) -> tuple[TrainingRun, list[dict]]:
    """One process, one learner, the union of the ranks' tasks, ``iterations`` steps; the run
    and its step records."""
    run = TrainingRun(config, folder, progress=False)
    run.sampler = _UnionSampler(run, world)  # type: ignore[assignment]
    return run, [run.step() for _ in range(config.iterations)]


@pytest.mark.data
@pytest.mark.slow
@needs_omniglot
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_two_ranks_equal_one_process_on_the_same_tasks(tmp_path: Path, algo: str) -> None:
    """float64, tolerance 1e-12: only the summation order of the task average differs (per rank,
    then across ranks), a few ulps per step (measured: at most 3e-15 after 4 steps).

    SGD, not Adam: the convolution biases before BatchNorm have an exactly zero gradient, so
    theirs is rounding noise (~1e-17), which Adam's ``m/√v`` scales up to steps of size ``lr``;
    with Adam those 8-element biases then differ by ~1e-7 while every other tensor agrees to
    1e-15 — a property of Adam on a zero gradient, not of the all-reduce."""
    # mrml with plain steps: Newton's stopping rule and line search are discontinuous in the
    # rounding-level differences of the all-reduce, which this test is not about.
    warm = (
        {"warm_start_head": True, "warm_start_cg": True, "exact_v": False, "inner_solver": "gd"}
        if algo == "mrml"
        else {}
    )
    config = TINY.replace(algo=algo, dtype="float64", iterations=4, optimizer="sgd", lr=0.1, **warm)
    out = tmp_path / "two-ranks"
    _run(_launch(config.replace(distributed=True, dist_timeout=60.0), out))
    reference, records = _one_process_reference(config, tmp_path / "reference", world=2)
    ranks_state = _learner_state(out)
    for key, expected in reference.learner.state_dict().items():
        if isinstance(expected, torch.Tensor):
            assert ranks_state[key].dtype == torch.float64, key
            torch.testing.assert_close(ranks_state[key], expected, rtol=1e-12, atol=1e-12)
    logged = [r["loss"] for r in _train_records(out)]
    computed = [r["loss"] for r in records]
    assert logged == pytest.approx(computed, rel=1e-12)


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """PID of the worker of global rank ``rank`` that torchrun started."""
    children = []
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        children += (task / "children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def _wait_for_iterations(run_dir: Path, count: int, launcher: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(_train_records(run_dir)) >= count:
            return
        if launcher.poll() is not None:
            pytest.fail(f"training exited early with {launcher.returncode}")
        time.sleep(0.05)
    pytest.fail("training did not reach the kill point in time")


def _wait_for_text(path: Path, text: str, limit: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if text in path.read_text(errors="replace"):
            return time.monotonic() - start
        time.sleep(0.1)
    pytest.fail(f"{text!r} did not appear in {limit} s: {path.read_text()[-2000:]}")


KILL_CONFIG = TINY.replace(
    iterations=60,
    checkpoint_every=1,
    warm_start_head=True,
    warm_start_cg=True,
    exact_v=False,
    distributed=True,
    dist_timeout=60.0,
)


@pytest.mark.data
@pytest.mark.slow
@needs_omniglot
@needs_proc
def test_killed_rank_stops_the_others_and_resume_is_exact(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    _run(_launch(KILL_CONFIG, reference))
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    with log.open("w") as handle:
        launcher = subprocess.Popen(_launch(KILL_CONFIG, killed), stdout=handle, stderr=handle)
    try:
        _wait_for_iterations(killed, 6, launcher)
        os.kill(_worker_pid(launcher, rank=1), signal.SIGKILL)
        launcher.wait(timeout=LAUNCH_BOUND)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    output = log.read_text()
    assert "mrmeta: error: rank 0" in output and "with --resume" in output, output[-3000:]
    assert not (killed / "result.json").exists(), "the run finished before it was killed"
    state = torch.load(killed / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert 0 < state["progress"]["iteration"] < KILL_CONFIG.iterations
    _run(_torchrun(2, ["--out", str(killed), "--resume"]))
    expected, resumed = _learner_state(reference), _learner_state(killed)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert len(_train_records(killed)) == KILL_CONFIG.iterations


@pytest.mark.data
@pytest.mark.slow
@needs_omniglot
@needs_proc
def test_hung_rank_makes_the_others_fail_after_the_timeout(tmp_path: Path) -> None:
    """A rank that stops answering (SIGSTOP: alive, sockets open) is noticed by the timeout."""
    config = KILL_CONFIG.replace(iterations=100_000, dist_timeout=5.0)
    out, log = tmp_path / "hung", tmp_path / "hung.log"
    with log.open("w") as handle:
        launcher = subprocess.Popen(_launch(config, out), stdout=handle, stderr=handle)
    stopped = None
    try:
        _wait_for_iterations(out, 3, launcher)
        stopped = _worker_pid(launcher, rank=1)
        os.kill(stopped, signal.SIGSTOP)
        _wait_for_text(log, "mrmeta: error: rank 0", limit=LAUNCH_BOUND)
        # Rank 0 started the collective it timed out in after its last write to metrics.jsonl
        # (every collective before that write completed), so the error comes >= 5 s after that
        # write, however the load delays either rank. Timing from the SIGSTOP instead was flaky:
        # a loaded rank 1 can stop while rank 0 already waits, shortening the gap below 5 s.
        # 4.5 s: margin for the file system's coarse mtime clock; a 1-2 s timeout fails this.
        since_last_write = time.time() - (out / "metrics.jsonl").stat().st_mtime
        assert since_last_write >= 4.5, (
            f"rank 0 failed {since_last_write:.1f} s after its last step, before the 5 s timeout"
        )
        os.kill(stopped, signal.SIGCONT)  # let the stopped rank receive torchrun's SIGTERM
        launcher.wait(timeout=LAUNCH_BOUND)
    finally:
        if stopped is not None and launcher.poll() is None:
            os.kill(stopped, signal.SIGKILL)
        launcher.kill()
    output = log.read_text()
    assert "did not answer within the timeout" in output, output[-3000:]
    assert launcher.returncode != 0
    torch.load(out / "last.pt", weights_only=True)  # the last checkpoint is intact


@pytest.mark.gpu
@pytest.mark.data
@pytest.mark.slow
@needs_omniglot
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_ranks_train_on_the_gpu(tmp_path: Path) -> None:
    nproc = min(2, torch.cuda.device_count())
    config = TINY.replace(
        device="cuda", distributed=True, iterations=4, meta_batch=2 * nproc, dist_timeout=120.0
    )
    out = tmp_path / "nccl"
    path = tmp_path / "nccl.toml"
    path.write_text(_toml(config))
    _run(_torchrun(nproc, ["--config", str(path), "--out", str(out)]))
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["world_size"] == nproc and state["progress"]["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in _learner_state(out).values())
