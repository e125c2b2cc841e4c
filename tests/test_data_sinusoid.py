"""Sinusoid regression tasks (MAML section 5.1)."""

from __future__ import annotations

import math

import pytest
import torch

from mrmeta.data import DataError, SinusoidSampler, SinusoidTasks, load_dataset


def test_shapes_ranges_and_function():
    sampler = SinusoidSampler(SinusoidTasks(), shots=5, queries=7, seed=0)
    batch, amplitude, phase = sampler.sample_with_params(1000)
    assert batch.support_x.shape == (1000, 5, 1) and batch.support_y.shape == (1000, 5, 1)
    assert batch.query_x.shape == (1000, 7, 1) and batch.query_y.dtype == torch.float32
    assert 0.1 <= float(amplitude.min()) and float(amplitude.max()) <= 5.0
    assert 0.0 <= float(phase.min()) and float(phase.max()) <= math.pi
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    y = torch.cat([batch.support_y, batch.query_y], dim=1)
    assert -5.0 <= float(x.min()) and float(x.max()) <= 5.0
    # Reference computed in float64, independently of the sampler's formula.
    ref = amplitude.double()[:, None, None] * torch.sin(x.double() - phase.double()[:, None, None])
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)
    # The draws cover their ranges (uniform): means near the midpoints.
    assert abs(float(amplitude.mean()) - 2.55) < 0.2 and abs(float(x.mean())) < 0.2


def test_seeds_and_resume():
    tasks = SinusoidTasks()
    a = SinusoidSampler(tasks, 4, 4, seed=3).sample(8)
    b = SinusoidSampler(tasks, 4, 4, seed=3).sample(8)
    c = SinusoidSampler(tasks, 4, 4, seed=4).sample(8)
    assert torch.equal(a.support_y, b.support_y) and not torch.equal(a.support_y, c.support_y)
    sampler = SinusoidSampler(tasks, 4, 4, seed=3)
    state = sampler.state_dict()
    first = sampler.sample(8)
    sampler.load_state_dict(state)
    assert torch.equal(sampler.sample(8).query_x, first.query_x)


def test_registry_and_bad_input():
    tasks = load_dataset("sinusoid", "test", amplitude=(1.0, 2.0))
    assert isinstance(tasks, SinusoidTasks) and tasks.amplitude == (1.0, 2.0)
    with pytest.raises(DataError, match="shots must be"):
        SinusoidSampler(tasks, 0, 10)
    with pytest.raises(DataError, match="finite"):
        SinusoidTasks(amplitude=(2.0, 1.0))
    with pytest.raises(DataError, match="no split"):
        load_dataset("sinusoid", "holdout")
