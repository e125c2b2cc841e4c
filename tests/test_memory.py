"""Tests for the peak-memory meter: known allocation patterns give known peaks.

Tensors are float32 (4 bytes per element), so sizes are exact; the CPU profiler reports the
requested byte counts, and tolerances (stated per test) only absorb small stray allocations.
"""

from __future__ import annotations

import pytest
import torch

from mrmeta.memory import format_bytes, measure_peak_memory

MB = 1_000_000
FLOAT32_PER_MB = MB // 4


def test_free_then_two_at_once_peaks_at_4_mb() -> None:
    torch.manual_seed(0)

    def fn() -> None:
        a = torch.randn(1_000_000)  # 4 MB
        del a  # back to 0
        b, c = torch.randn(500_000), torch.randn(500_000)  # 2 MB + 2 MB alive together
        del b, c

    peak = measure_peak_memory(fn)
    assert peak == pytest.approx(4 * MB, rel=0.01)  # not 8 MB: the free is counted


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_peak_grows_linearly_with_live_tensors(warmup: int) -> None:
    torch.manual_seed(0)

    def keep_alive(k: int) -> None:
        tensors = [torch.randn(FLOAT32_PER_MB) for _ in range(k)]  # k x 1 MB alive at once
        del tensors

    peaks = [measure_peak_memory(lambda k=k: keep_alive(k), warmup=warmup) for k in range(1, 5)]
    for k, peak in enumerate(peaks, start=1):
        assert peak == pytest.approx(k * MB, rel=0.02)
    steps = [later - earlier for earlier, later in zip(peaks[:-1], peaks[1:], strict=True)]
    assert steps == pytest.approx([MB] * 3, rel=0.02)


def test_allocation_inside_nested_op_is_counted() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(1000, 64), torch.randn(64, 250)
    # aten::matmul dispatches to aten::mm, which allocates the 1000 x 250 output (1 MB).
    peak = measure_peak_memory(lambda: torch.matmul(a, b))
    assert peak == pytest.approx(1 * MB, rel=0.01)


def test_state_replaced_between_calls_is_netted_out() -> None:
    # Like an outer step that drops last step's gradients (zero_grad(set_to_none=True)) and
    # makes new ones: the 4 MB freed were allocated by the warm-up call, so the free is traced.
    state: dict[str, torch.Tensor] = {}

    def fn() -> None:
        state.pop("grad", None)  # -4 MB (after the first call)
        state["grad"] = torch.zeros(1_000_000)  # +4 MB, kept
        scratch = torch.zeros(500_000)  # +2 MB: net +2 MB above the start
        del scratch

    assert measure_peak_memory(fn, warmup=1) == pytest.approx(2 * MB, rel=0.01)


def test_nothing_allocated_gives_zero() -> None:
    assert measure_peak_memory(lambda: None) == 0


def test_warmup_calls_fn_warmup_plus_one_times() -> None:
    calls = []
    measure_peak_memory(lambda: calls.append(1), warmup=3)
    assert len(calls) == 4


def _mlp_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    loss = model(x).square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)  # every call starts and ends without gradients


def test_mlp_forward_backward_above_hand_computed_bound_and_repeatable() -> None:
    torch.manual_seed(0)
    batch, n_in, hidden, n_out = 64, 100, 200, 10
    model = torch.nn.Sequential(
        torch.nn.Linear(n_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_out)
    )
    x = torch.randn(batch, n_in)
    hidden_bytes = batch * hidden * 4
    # Lower bounds from tensors that must be alive together:
    # forward, inside ReLU: its input and its output (both batch x hidden);
    # backward, computing the first weight's gradient: d loss / d hidden and that gradient.
    relu_in_and_out = 2 * hidden_bytes
    hidden_grad_and_w1_grad = hidden_bytes + hidden * n_in * 4
    lower_bound = max(relu_in_and_out, hidden_grad_and_w1_grad)

    first = measure_peak_memory(lambda: _mlp_step(model, x))
    second = measure_peak_memory(lambda: _mlp_step(model, x))

    assert first >= lower_bound
    assert second == pytest.approx(first, rel=0.01)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1_000, "1.0 kB"),
        (77_500_000, "77.5 MB"),
        (257_000_000, "257.0 MB"),
        (999_960, "1.0 MB"),  # rounds up into the next unit, never "1000.0 kB"
        (1_234_567_890, "1.2 GB"),
        (-2_000_000, "-2.0 MB"),
        (5 * 10**18, "5000.0 PB"),
    ],
)
def test_format_bytes(n: int, expected: str) -> None:
    assert format_bytes(n) == expected


def test_format_bytes_rejects_non_integers() -> None:
    with pytest.raises(TypeError, match="integer"):
        format_bytes(1.5)  # type: ignore[arg-type]


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(TypeError, match="callable"):
        measure_peak_memory(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup"):
        measure_peak_memory(lambda: None, warmup=-1)
    with pytest.raises(TypeError, match="warmup"):
        measure_peak_memory(lambda: None, warmup=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device"):
        measure_peak_memory(lambda: None, device="meta")


def test_cpu_refuses_to_run_inside_another_profiler() -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        with pytest.raises(RuntimeError, match="profiler"):
            measure_peak_memory(lambda: None)


def test_adam_step_repeatable_across_warmup_counts() -> None:
    # A training step that drops last step's gradients first: the result must not depend on
    # how many warm-up steps ran (Adam's state is made by the first one).
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(500, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 10)
    )
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(128, 500)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    peaks = [measure_peak_memory(step, warmup=warmup) for warmup in (1, 2, 3)]
    assert peaks == pytest.approx([peaks[0]] * 3, rel=0.01)
    hidden_activations = 2 * 128 * 1000 * 4  # Linear output and ReLU output, both kept
    assert peaks[0] >= hidden_activations


def test_cpu_device_given_explicitly_matches_default() -> None:
    def fn() -> None:
        torch.empty(FLOAT32_PER_MB)

    assert measure_peak_memory(fn, device="cpu") == measure_peak_memory(fn)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_raises() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        measure_peak_memory(lambda: None, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_matches_known_pattern() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    resident = torch.zeros(2_000_000, device=device)  # 8 MB held throughout; not counted

    def fn() -> None:
        a = torch.randn(1_000_000, device=device)  # 4 MB
        del a
        tensors = [torch.randn(FLOAT32_PER_MB, device=device) for _ in range(3)]  # 3 MB at once
        del tensors

    peak = measure_peak_memory(fn, device=device)
    # The caching allocator rounds blocks up to 512 bytes: 1% covers it.
    assert peak == pytest.approx(4 * MB, rel=0.01)
    assert measure_peak_memory(fn, device="cuda") == peak
    # A CPU measurement of a CUDA-only function sees no CPU allocations.
    assert measure_peak_memory(fn, device="cpu") == 0
    del resident
