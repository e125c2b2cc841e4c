"""Peak-memory meter shared by every benchmark and test of mrmeta.

One number per method: the peak number of bytes PyTorch allocated while a function ran, above
what was allocated when it started. On CPU it is read from the PyTorch profiler's allocation
trace; on CUDA from the caching allocator's statistics (see docs/design.md §7.1).
"""

from __future__ import annotations

import gc
import numbers
from collections.abc import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["format_bytes", "measure_peak_memory"]

_MEMORY_EVENT = "[memory]"
_MEASURED_CALL = "mrmeta::measured_call"
_DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def measure_peak_memory(
    fn: Callable[[], object],
    *,
    device: torch.device | str | None = None,
    warmup: int = 1,
) -> int:
    """Peak bytes allocated by PyTorch during one call of ``fn``, above the starting level.

    ``fn`` is called ``warmup`` times unmeasured, then once more under measurement. With
    :math:`a_t` the bytes PyTorch holds on ``device`` at time :math:`t` of that call and
    :math:`a_0` the bytes held when it starts, the result is

    .. math:: \\max\\bigl(0, \\max_t (a_t - a_0)\\bigr),

    the running maximum of the net allocation. Tensors freed during the call lower :math:`a_t`;
    whether ``fn`` returns its tensors or drops them does not change the peak.

    On CPU the trace comes from ``torch.profiler.profile(activities=[ProfilerActivity.CPU],
    profile_memory=True)``, held over the warm-up calls too: its ``[memory]`` events inside the
    measured call (bytes allocated, positive, or freed, negative) are sorted stably by start
    time, summed cumulatively, and their running maximum taken. Allocations inside nested
    operators and in backward passes are counted; CUDA allocations are not.

    Limits of the CPU trace. The allocator records a block's size only while memory profiling is
    on, and keeps that record until the block is freed under profiling. So the peak is exact
    when ``fn`` frees only tensors that ``fn`` itself or its warm-up made (use ``warmup >= 1``
    for a step that replaces the previous step's gradients). Freeing a tensor made before this
    function was called is either missed (the peak comes out higher than on CUDA) or, if its
    address held a block recorded by an earlier measurement, traced with that block's size: keep
    such tensors alive during ``fn``. Allocations by Python threads that ``fn`` starts are not
    seen. It cannot run while a PyTorch profiler is already running.

    On CUDA: ``torch.cuda.reset_peak_memory_stats``, then ``max_memory_allocated`` minus
    ``memory_allocated`` before the call, with the device synchronized around it. Sizes are those
    of the caching allocator's blocks (rounded up to multiples of 512 bytes), so they can
    exceed the tensors' ``nbytes`` slightly.

    Args:
        fn: The function to measure, called with no arguments. Its return value is ignored.
        device: Where to measure: ``None`` or a CPU device for the CPU allocator, a CUDA device
            (``"cuda"``, ``"cuda:1"``) for that GPU. ``None`` never picks CUDA by itself.
        warmup: Number of unmeasured calls before the measured one (lazy initialisation, caches).

    Returns:
        The peak net allocation in bytes, ``>= 0``.

    Raises:
        TypeError: If ``fn`` is not callable or ``warmup`` is not an int.
        ValueError: If ``warmup`` is negative, or ``device`` is neither CPU nor CUDA.
        RuntimeError: If a CUDA device is asked for and CUDA is not available, or on CPU if a
            PyTorch profiler is already running.

    Example:
        >>> def step() -> None:
        ...     a = torch.empty(1_000_000)  # 4 MB of float32
        ...     del a
        ...     b, c = torch.empty(500_000), torch.empty(500_000)  # 2 x 2 MB at once
        >>> measure_peak_memory(step)
        4000000
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable with no arguments, got {type(fn).__name__}.")
    _check_warmup(warmup)
    dev = _resolve_device(device)
    if dev.type == "cuda":
        return _peak_cuda(fn, dev, warmup)
    return _peak_cpu(fn, warmup)


def format_bytes(n: int) -> str:
    """Human-readable size in decimal units (1 MB = 10**6 bytes), as the paper reports memory.

    Args:
        n: A number of bytes; may be negative (a difference of sizes).

    Returns:
        Whole bytes below 1 kB (``"512 B"``), otherwise one decimal in the largest unit that keeps
        the number below 1000: ``"77.5 MB"``, ``"1.2 GB"``.

    Raises:
        TypeError: If ``n`` is not an integer.

    Example:
        >>> format_bytes(77_500_000)
        '77.5 MB'
    """
    if not isinstance(n, numbers.Integral) or isinstance(n, bool):
        raise TypeError(f"n must be an integer number of bytes, got {type(n).__name__}.")
    sign, size = ("-" if n < 0 else ""), abs(int(n))
    if size < 1000:
        return f"{sign}{size} B"
    for power, unit in enumerate(_DECIMAL_UNITS[1:], start=1):
        value = size / 1000**power
        if round(value, 1) < 1000 or unit == _DECIMAL_UNITS[-1]:
            return f"{sign}{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def _check_warmup(warmup: int) -> None:
    if not isinstance(warmup, numbers.Integral) or isinstance(warmup, bool):
        raise TypeError(f"warmup must be an int, got {type(warmup).__name__}.")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 (number of unmeasured calls), got {warmup}.")


def _resolve_device(device: torch.device | str | None) -> torch.device:
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device must be a CPU or CUDA device, got {str(dev)!r}; "
            "pass None or 'cpu' for the CPU allocator, 'cuda' or 'cuda:N' for a GPU."
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={str(dev)!r} was asked for but CUDA is not available.")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _peak_cpu(fn: Callable[[], object], warmup: int) -> int:
    # The warm-up runs under the same profiler: the CPU allocator only learns the size of a block
    # allocated while memory profiling is on, so only then is its later free traced.
    if torch.autograd._profiler_enabled():
        raise RuntimeError(
            "measure_peak_memory on CPU starts its own torch.profiler session and cannot run "
            "inside another one (it would end the outer session); call it outside the profiler."
        )
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(warmup):
            fn()
        gc.collect()  # so that a collection does not free earlier garbage mid-measurement
        with record_function(_MEASURED_CALL):
            fn()
    return _running_peak(_measured_memory_deltas(prof))


def _measured_memory_deltas(prof: profile) -> list[tuple[int, int]]:
    """``(start_ns, bytes)`` of the CPU ``[memory]`` events inside the measured call.

    Read from the raw Kineto events (``prof.profiler.kineto_results.events()``: ``name()``,
    ``start_ns()``, ``nbytes()``, ``device_type()``), not from ``prof.events()``: there an
    allocation made inside an operator is folded into that operator's ``cpu_memory_usage`` and
    only allocations outside any operator (mostly frees) remain as ``[memory]`` events.
    """
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        raise RuntimeError("the profiler recorded no trace; is another profiler running?")
    events = list(results.events())
    (window,) = [event for event in events if event.name() == _MEASURED_CALL]
    start, end = window.start_ns(), window.end_ns()
    return [
        (event.start_ns(), event.nbytes())
        for event in events
        if event.name() == _MEMORY_EVENT
        and event.device_type() == torch.autograd.DeviceType.CPU
        and start <= event.start_ns() <= end
    ]


def _running_peak(deltas: Iterable[tuple[int, int]]) -> int:
    """Running maximum (floored at 0) of the cumulative bytes, events sorted stably by time."""
    level = peak = 0
    for _, nbytes in sorted(deltas, key=lambda delta: delta[0]):
        level += nbytes
        peak = max(peak, level)
    return peak


def _peak_cuda(fn: Callable[[], object], device: torch.device, warmup: int) -> int:
    for _ in range(warmup):
        fn()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)
