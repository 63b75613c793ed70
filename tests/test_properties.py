"""Property: over random shapes, dtypes, layouts and injected bad values,
SafeBatchNorm either matches native or reports, and never poisons its buffers."""
from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_safebn
from conftest import NATIVE_FOR_DIM, TOLERANCE

BAD_VALUES = [None, float("nan"), float("inf"), float("-inf"), 3e38]


@st.composite
def cases(draw):
    dims = draw(st.integers(2, 5))
    shape = [draw(st.integers(0, 4)), draw(st.integers(1, 5))] + [draw(st.integers(1, 4)) for _ in range(dims - 2)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    channels_last = dims in (4, 5) and draw(st.booleans())
    bad = draw(st.sampled_from(BAD_VALUES))
    seed = draw(st.integers(0, 2**16))
    position = draw(st.integers(0, 10**6))
    return shape, dtype, channels_last, bad, seed, position


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_matches_native_or_reports_and_never_poisons(case):
    shape, dtype, channels_last, bad, seed, position = case
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    if bad is not None and x.numel():
        x.view(-1)[position % x.numel()] = bad
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    native = NATIVE_FOR_DIM[len(shape)](shape[1], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    safe = torch_safebn.convert_model(copy.deepcopy(native), on_nonfinite="skip", on_single_sample="ignore",
                                      on_degenerate="running_stats")
    count = x.numel() // shape[1]
    y = safe(x)
    stats = torch_safebn.report(safe).rows[0]
    for name in ("running_mean", "running_var"):
        assert torch.isfinite(getattr(safe, name)).all(), f"{name} poisoned"
    clean = bool(torch.isfinite(x.float()).all()) and bad != 3e38
    if count > 1 and clean:
        y_native = native(x)
        atol, rtol = TOLERANCE[dtype]
        torch.testing.assert_close(y.double(), y_native.double(), atol=atol, rtol=rtol)
        torch.testing.assert_close(safe.running_var, native.running_var, atol=atol, rtol=rtol)
        assert stats["skipped_updates"] == 0
    elif count == 1:
        assert stats["degenerate_batches"] == 1 and safe.num_batches_tracked.item() == 0
    elif count > 1:
        # A non-finite value, or one whose square overflows float32: either
        # the statistics stay finite and the update applies, or it is reported.
        applied = safe.num_batches_tracked.item() == 1
        assert applied or (stats["nonfinite_events"] == 1 and stats["skipped_updates"] == 1)
        if not applied:
            assert torch.equal(safe.running_mean, torch.zeros_like(safe.running_mean))
    else:
        assert safe.num_batches_tracked.item() == 0 and y.shape == x.shape
