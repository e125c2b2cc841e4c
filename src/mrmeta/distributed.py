"""``torch.distributed`` helpers: the tasks of a meta-batch sharded across processes.

One process per rank, launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``). With ``W`` ranks and a meta-batch of ``B``
tasks, rank ``r`` draws its own ``B / W`` tasks from a sampler seeded with
:func:`rank_seed` ``(seed, r) = seed + 1000·r`` (rank 0 keeps the one-process seed; no two ranks
share a stream), computes their meta-gradient ``ĝ_r = (W/B) Σ_{i ∈ r} ∇ f_i``, and one
all-reduce per step averages them: ``ĝ = (1/W) Σ_r ĝ_r = (1/B) Σ_i ∇ f_i``, the meta-gradient
of the whole batch. Every rank then takes the same optimizer step on the same averaged
gradient, so the parameters stay identical without further communication.

Backends: ``gloo`` on CPU, ``nccl`` on CUDA (one GPU per process, ``cuda:LOCAL_RANK``). Every
collective has the process group's timeout: a peer that dies closes its sockets and the others
fail at once; a peer that hangs makes them fail after ``timeout`` seconds. Either way they raise
:class:`DistributedError` with a one-line explanation instead of waiting forever. On NCCL, the
watchdog of ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` (on by default) aborts a timed-out collective.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mrmeta.errors import ConfigError, MrmetaError

RANK_SEED_STRIDE = 1000
"""Rank ``r``'s task sampler is seeded with ``seed + RANK_SEED_STRIDE * r``."""

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

_joined_process_group = False
"""Whether this process has joined a process group (set by :func:`init_distributed`)."""


class DistributedError(MrmetaError, RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or this rank was stopped."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the process group (a one-process run when not ``enabled``).

    Attributes:
        rank: global rank ``0..world_size-1``.
        world_size: number of processes ``W``.
        local_rank: rank on this node (picks the GPU).
        enabled: a process group is initialised.
        device: where collectives' tensors live (``cpu`` for gloo, ``cuda:local_rank`` for nccl).
        timeout: seconds a collective waits for the other ranks.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout: float = 0.0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, validates, tests and writes checkpoints."""
        return self.rank == 0


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s training task sampler: ``seed + 1000·rank`` (rank 0: ``seed``)."""
    return int(seed) + RANK_SEED_STRIDE * int(rank)


def shard_size(meta_batch: int, world_size: int) -> int:
    """Tasks each rank draws per step, ``meta_batch / world_size`` (must divide exactly)."""
    if meta_batch % world_size:
        suggestion = world_size * max(1, round(meta_batch / world_size))
        raise ConfigError(
            f"meta_batch={meta_batch} is not divisible by the {world_size} processes; choose "
            f"--meta-batch as a multiple of the world size (e.g. {suggestion})"
        )
    return meta_batch // world_size


def launched_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str, timeout: float) -> DistContext:
    """Join the process group torchrun described in the environment.

    Args:
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (nccl, one GPU per process).
        timeout: seconds any collective (and the rendezvous) waits before it fails.

    Raises:
        ConfigError: not launched by torchrun, or not enough GPUs on this node.
    """
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ConfigError(
            f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing); "
            "launch with 'torchrun --nproc_per_node P -m mrmeta train ... --distributed'"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = _rank_device(device_type, local_rank)
    options: dict[str, Any] = {"timeout": timedelta(seconds=timeout)}
    if device.type == "cuda":
        options["device_id"] = device
    backend = "nccl" if device.type == "cuda" else "gloo"
    with collective(rank, "joining the process group"):
        dist.init_process_group(backend, rank=rank, world_size=world, **options)
    global _joined_process_group
    _joined_process_group = True
    _install_sigterm_handler(rank)
    return DistContext(rank, world, local_rank, True, device, float(timeout))


def _rank_device(device_type: str, local_rank: int) -> torch.device:
    if device_type != "cuda":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this node has {count} CUDA device(s); run at most "
            f"{count} processes per node (--nproc_per_node {count})"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _install_sigterm_handler(rank: int) -> None:
    """Turn torchrun's SIGTERM (sent to every rank when one fails) into an error message."""

    def stop(signum: int, frame: object) -> None:
        raise DistributedError(
            f"rank {rank}: stopped by SIGTERM (torchrun stops every rank when one of them fails)"
        )

    signal.signal(signal.SIGTERM, stop)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (if any) and restore the default SIGTERM handling."""
    if not ctx.enabled:
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(status: int) -> NoReturn:
    """End the command-line process with exit status ``status``.

    A process that joined a process group ends with :func:`os._exit` once its output is
    flushed, skipping the interpreter's and the C++ runtime's teardown. That teardown can
    abort a gloo rank after :func:`shutdown` has already left the group ("terminate called
    without an active exception", SIGABRT): 2 of 282 two-rank launches of ``mrmeta train``
    on a 2-core machine, after every line of Python had returned (the rank's main thread had
    no Python frame), and torchrun then stops the other ranks, rank 0 included, before rank 0
    has written its results. Everything the run writes is closed before this point; other
    processes exit normally.
    """
    if not _joined_process_group:
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


@contextlib.contextmanager
def collective(rank: int, what: str) -> Iterator[None]:
    """Turn a failed collective into a :class:`DistributedError` that says what happened."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:  # DistError and plain gloo/NCCL errors alike
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DistributedError(
            f"rank {rank}: {what} failed: another process stopped or did not answer within "
            f"the timeout ({first_line})"
        ) from err


def average_gradients(params: Iterable[nn.Parameter], ctx: DistContext) -> None:
    """Replace every ``.grad`` by its mean over the ranks, in one all-reduce.

    The gradients are flattened into one buffer (in the promoted dtype of the parameters),
    followed by one "has a gradient" flag per parameter; the buffer is summed across ranks and
    divided by ``W``. A parameter without a gradient counts as zeros; one without a gradient on
    every rank keeps ``grad = None`` (so optimizers skip it exactly as in one process).

    Args:
        params: the meta-parameters, in the same order on every rank.
        ctx: the process group.
    """
    params = list(params)
    if not ctx.enabled or not params:
        return
    dtype = _common_dtype(params)
    parts = [
        torch.zeros(p.numel(), dtype=dtype, device=ctx.device)
        if p.grad is None
        else p.grad.detach().reshape(-1).to(ctx.device, dtype)
        for p in params
    ]
    flags = [float(p.grad is not None) for p in params]
    parts.append(torch.tensor(flags, dtype=dtype, device=ctx.device))
    buffer = torch.cat(parts)
    with collective(ctx.rank, "the gradient all-reduce"):
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    buffer /= ctx.world_size
    _unflatten_into_grads(params, buffer)


def _common_dtype(params: list[nn.Parameter]) -> torch.dtype:
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _unflatten_into_grads(params: list[nn.Parameter], buffer: Tensor) -> None:
    present = (buffer[-len(params) :] != 0).tolist()
    offset = 0
    for p, has_grad in zip(params, present, strict=True):
        values = buffer[offset : offset + p.numel()]
        offset += p.numel()
        p.grad = values.view_as(p).to(p.device, p.dtype).clone() if has_grad else None


def gather_rows(values: list[float], ctx: DistContext) -> Tensor:
    """Every rank's ``values``: ``(W, len(values))`` float64 on the CPU, the same on all ranks."""
    row = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if not ctx.enabled:
        return row.unsqueeze(0).cpu()
    rows = [torch.empty_like(row) for _ in range(ctx.world_size)]
    with collective(ctx.rank, "gathering the step statistics"):
        dist.all_gather(rows, row)
    return torch.stack(rows).cpu()


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` (picklable) as a list on rank 0; ``None`` on the other ranks."""
    if not ctx.enabled:
        return [obj]
    gathered: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    with collective(ctx.rank, "gathering the ranks' checkpoint state"):
        dist.gather_object(obj, gathered, dst=0)
    return gathered


def check_on_main(check: Callable[[], None], ctx: DistContext) -> None:
    """Run ``check`` on rank 0; a :class:`~mrmeta.errors.MrmetaError` it raises is raised on
    every rank (as itself on rank 0, as a :class:`ConfigError` with its message elsewhere)."""
    message, failure = None, None
    if ctx.is_main:
        try:
            check()
        except MrmetaError as err:
            message, failure = str(err), err
    if ctx.enabled:
        box = [message]
        with collective(ctx.rank, "sharing rank 0's checks"):
            dist.broadcast_object_list(box, src=0)
        message = box[0]
    if failure is not None:
        raise failure
    if message is not None:
        raise ConfigError(message)


def broadcast_module(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (identical start)."""
    if not ctx.enabled:
        return
    with collective(ctx.rank, "broadcasting rank 0's parameters"), torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            staged = tensor.detach().to(ctx.device)
            dist.broadcast(staged, src=0)
            tensor.copy_(staged)


def to_cpu(tree: Any) -> Any:
    """Tensors of a nested dict/list/tuple moved to the CPU (for gathering between ranks)."""
    if isinstance(tree, Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(to_cpu(v) for v in tree)
    return tree
