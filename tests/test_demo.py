"""The motivating report's claims, asserted (python -m torch_safebn demo)."""
from __future__ import annotations

import math

from torch_safebn.tools import demo
from torch_safebn.tools.text import WIDTH

SEEDS = range(10)


def test_native_diverges_silently_and_safebatchnorm_says_where_and_why():
    diverged = 0
    for seed in SEEDS:
        native = demo.train(seed, safe=False)
        safe = demo.train(seed, safe=True)
        assert native.error is None and not native.warnings, "native says nothing"
        assert any("single example" in w for w in safe.warnings), "warned at step 0 about the single example"
        assert math.isfinite(safe.running_mean) and math.isfinite(safe.running_var)
        if not native.diverged:
            assert safe.error is None
            continue
        diverged += 1
        assert safe.error is not None and safe.error.startswith("NonFiniteError: SafeBatchNorm2d(1) '0'")
        assert "lower the learning rate" in safe.error
        # it stops at the step whose forward first sees a non-finite weight or
        # bias (the loss can overflow a step earlier, downstream of the module);
        # after the last step, check() finds it
        assert safe.error_step == native.parameters_nonfinite_step
    assert diverged >= 5, "the report: about 6 runs out of 10 diverge"


def test_skip_keeps_going_with_finite_buffers_and_a_lower_lr_converges():
    for seed in SEEDS:
        skip = demo.train(seed, safe=True, on_nonfinite="skip")
        assert skip.error is None and len(skip.losses) == 10
        assert math.isfinite(skip.running_var)
        if skip.diverged and skip.first_nonfinite_step < 9:
            assert skip.skipped_updates > 0
        assert not demo.train(seed, safe=False, lr=0.05).diverged


def test_demo_command_prints_the_side_by_side(capsys):
    assert demo.main(["--seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert "no message" in out and "NonFiniteError at step" in out and "single example" in out


def test_demo_output_fits_100_columns(capsys):
    assert demo.main(["--seeds", "6"]) == 0  # seed 5 raises via check(): the widest row
    lines = capsys.readouterr().out.splitlines()
    assert any("via check()" in line for line in lines)
    assert max(map(len, lines)) <= WIDTH
