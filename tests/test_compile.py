"""torch.compile(fullgraph=True), torch.export and torch.fx over converted
models: no graph break, no more recompiles than native over batch sizes, the
same numbers as eager, the running statistics updated the same way, and the
same errors and warnings at the same step."""
from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn

import torch_safebn
from torch_safebn.contract import Counter


def _model():
    torch.manual_seed(0)
    return torch_safebn.convert_model(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                                    nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))


@pytest.fixture(params=["lowered", "kernels"])
def compiled_path(request, monkeypatch):
    """Each of the two ways compiled code runs a CPU batch norm, whatever the input's size:
    lowered to ATen ops, or the fused kernels kept (lowering.KERNELS_FROM_VALUES_PER_CHANNEL)."""
    threshold = math.inf if request.param == "lowered" else 0
    monkeypatch.setitem(torch_safebn.lowering.KERNELS_FROM_VALUES_PER_CHANNEL, "cpu", threshold)
    return request.param


@pytest.mark.usefixtures("compiled_path")
@pytest.mark.parametrize("training", [True, False])
def test_compiled_model_matches_eager(training):
    torch._dynamo.reset()
    eager = _model().train(training)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="inductor")
    for step in range(2):
        x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(step), requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y_eager, y_compiled = eager(x), compiled(x2)
        torch.testing.assert_close(y_compiled, y_eager, atol=1e-5, rtol=1e-5)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=name)
        # The ops that update and check them take the (grad-requiring) weight and bias.
        assert not b.requires_grad, f"{name} requires grad after a compiled step"
    # A conv bias followed by batch norm has a zero gradient in exact
    # arithmetic, so its computed one is rounding noise of the largest
    # gradient: the absolute tolerance scales with that.
    largest = max(p.grad.abs().max().item() for p in eager.parameters())
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=2e-6 * largest, rtol=1e-5, msg=name)


def test_no_graph_break():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_model())(torch.randn(4, 3, 10, 10))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def _graphs_over_batch_sizes(model, dynamic, side=10):
    """How many graphs torch.compile makes for a training step over changing batch sizes."""
    torch._dynamo.reset()
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(model, backend=counting, dynamic=dynamic, fullgraph=True)
    for n in (2, 3, 4, 5, 8, 2, 7, 9, 10, 11, 12, 13):
        compiled(torch.randn(n, 3, side, side)).sum().backward()
    return len(graphs)


@pytest.mark.parametrize("dynamic", [None, True])
def test_changing_batch_sizes_recompile_no_more_than_native(dynamic):
    """At 20 x 20 the batches cross KERNELS_FROM_VALUES_PER_CHANNEL (400 to 5200 values per
    channel): a batch norm with a fused activation must not guard on which side a batch is."""
    torch.manual_seed(0)
    native = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8))
    safe = torch_safebn.convert_model(copy.deepcopy(native))
    fused = copy.deepcopy(safe)
    fused[1], fused[2] = torch_safebn.SafeBatchNormAct2d(8, act=nn.SiLU()), nn.Identity()
    assert 400 * 13 >= torch_safebn.lowering.KERNELS_FROM_VALUES_PER_CHANNEL["cpu"] > 400 * 2
    natives = _graphs_over_batch_sizes(native, dynamic, side=20)
    assert natives <= 2
    assert _graphs_over_batch_sizes(safe, dynamic, side=20) <= natives
    assert _graphs_over_batch_sizes(fused, dynamic, side=20) <= natives


def test_mark_dynamic_batch():
    torch._dynamo.reset()
    x = torch.randn(4, 3, 10, 10)
    torch._dynamo.mark_dynamic(x, 0)
    model = _model()
    expected = copy.deepcopy(model)(x)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), expected)


@pytest.mark.parametrize("training", [True, False])
def test_export_with_a_dynamic_batch(training):
    """Training: the guarded ops, which update the running statistics as the module does. Eval: an
    artifact for inference, native's ops alone (tests/test_deployment.py)."""
    model = _model().train(training)
    eager = copy.deepcopy(model)
    program = torch.export.export(model, (torch.randn(4, 3, 10, 10),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    ops = [str(n.target) for n in program.graph.nodes if "safebn" in str(n.target)]
    assert ops == (["safebn.batch_norm_train.default"] * 2 if training else [])
    assert training or sum("batch_norm" in str(n.target) for n in program.graph.nodes) == 2
    exported = program.module()
    for n in (6, 3):
        x = torch.randn(n, 3, 10, 10)
        torch.testing.assert_close(exported(x), eager(x), atol=1e-5, rtol=1e-5)
    if training:  # the exported program updates the running statistics as the module does
        torch.testing.assert_close(exported.state_dict()["1.running_var"], eager[1].running_var)


def _train_the_report_model(seed, compiled, steps=12):
    """The motivating report: BatchNorm2d -> Conv2d on one [1, 1, 1, 16] example, SGD lr=0.1.
    Returns (the step that raised, its message, the warnings (text, file), the counters after)."""
    torch._dynamo.reset()
    torch.manual_seed(seed)
    example = torch.randn(1, 1, 1, 16)
    model = torch_safebn.convert_model(nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 1, [1, 16])))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    forward = torch.compile(model, fullgraph=True) if compiled else model
    step, message = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            try:
                loss = (forward(example) - 1).square().mean()  # the warnings' line
            except torch_safebn.NonFiniteError as error:
                message = str(error)
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    warned = [(str(w.message), w.filename) for w in caught if issubclass(w.category, RuntimeWarning)]
    return step, message, warned, model[0].safety_counters.tolist()


@pytest.mark.usefixtures("compiled_path")
def test_compiled_code_raises_and_warns_as_eager_at_the_same_step():
    eager = _train_the_report_model(seed=0, compiled=False)
    compiled = _train_the_report_model(seed=0, compiled=True)
    step, message, warned, counters = eager
    assert message is not None and "at training step 7" in message, "seed 0 diverges at step 7"
    assert compiled == eager
    # one warning per call, the raising one included, at the line that called the model
    assert len(warned) == step + 1 and all("single example" in text and file == __file__ for text, file in warned)


def test_fx_sees_a_converted_model_as_it_sees_the_native_one():
    """torch.fx records torch.nn's batch norms as module calls; the converted ones too, so that a
    traced model keeps its guards, and torchvision's feature extraction finds the same nodes."""
    from torchvision.models import resnet18
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    torch.manual_seed(0)
    native = resnet18(num_classes=10)
    safe = torch_safebn.convert_model(copy.deepcopy(native))
    traced_native, traced_safe = torch.fx.symbolic_trace(native), torch.fx.symbolic_trace(safe)
    nodes = [[(n.op, str(n.target)) for n in traced.graph.nodes] for traced in (traced_native, traced_safe)]
    assert nodes[1] == nodes[0] and ("call_module", "layer1.0.bn1") in nodes[1]
    assert isinstance(traced_safe.get_submodule("layer1.0.bn1"), torch_safebn.SafeBatchNorm2d)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(traced_safe(x), traced_native(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(safe.bn1.running_var, native.bn1.running_var)  # the traced call trained them
    assert get_graph_node_names(safe) == get_graph_node_names(native)
    returns = {"layer1.0.bn1": "bn", "layer4": "features"}
    safe_features = create_feature_extractor(safe.eval(), returns)(x)
    native_features = create_feature_extractor(native.eval(), returns)(x)
    for key in returns.values():
        torch.testing.assert_close(safe_features[key], native_features[key], atol=1e-4, rtol=1e-4)


def test_fx_tracing_a_lone_batch_norm_fails_as_native():
    """As the root of a trace a module is traced into, and native batch norm's input check stops it."""
    for module in (nn.BatchNorm2d(3), torch_safebn.SafeBatchNorm2d(3)):
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(module)


def _dynamo_graph_targets(model, x):
    """The ops in the graph torch.compile hands its backend, as strings."""
    torch._dynamo.reset()
    targets = []

    def recording(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch.compile(model, backend=recording, fullgraph=True)(x)
    return targets


def test_compiled_code_keeps_the_kernels_for_large_batch_norms_with_an_activation():
    """A plain batch norm, and one with a fused activation under KERNELS_FROM_VALUES_PER_CHANNEL
    values per channel, is written in aten ops in the compiled graph (no opaque safebn kernel
    for inductor to work around), the guard's update and the host's observe ops of its own; a
    batch norm with a fused activation from that size on runs the fused safebn op."""
    torch.manual_seed(0)
    model = torch_safebn.convert_model(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1), torch_safebn.SafeBatchNormAct2d(4, act=nn.SiLU())))
    from_values = torch_safebn.lowering.KERNELS_FROM_VALUES_PER_CHANNEL["cpu"]
    small = torch.randn(4, 3, 10, 10)  # 400 values per channel
    assert 400 < from_values
    lowered = _dynamo_graph_targets(model, small)
    assert "safebn.batch_norm_train.default" not in lowered
    assert lowered.count("safebn.update_running_stats.default") == 2
    assert lowered.count("safebn.observe.default") == 2
    assert sum("native_batch_norm" in target for target in lowered) == 4  # the guard's statistics, the output
    assert _dynamo_graph_targets(model.eval(), small).count("safebn.check_running_stats.default") == 2
    side = math.ceil(math.sqrt(from_values / 2))
    large = _dynamo_graph_targets(model.train(), torch.randn(2, 3, side, side))
    assert large.count("safebn.batch_norm_train.default") == 1  # the SiLU's
    assert large.count("safebn.update_running_stats.default") == 1  # the plain one's guard


def test_compiled_code_hands_the_fused_ops_channels_last_activations_without_copies():
    """Inductor runs a compiled convnet's convolutions channels-last; the ops take any strides
    (the flexible_layout tag), so they get the convolution's output as it is and the next
    convolution gets theirs: every activation-sized buffer, forward and backward, has the
    convolutions' strides (without the tag, four copies to and from contiguous per batch norm)."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch_safebn.convert_model(nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1), torch_safebn.SafeBatchNormAct2d(32, act=nn.SiLU()),
        nn.Conv2d(32, 24, 3, padding=1)))
    x = torch.randn(8, 16, 48, 48)  # 18432 values per channel: the fused kernels
    _, codes = run_and_get_code(lambda: torch.compile(model, fullgraph=True)(x).sum().backward())
    code = "\n".join(codes)
    assert code.count("torch.ops.safebn.forward_train.default(") == 1
    assert code.count("torch.ops.safebn.backward.default(") == 1
    # The batch norm's input, output and gradients (the model's output and its gradient have 24 channels).
    assert "(8, 32, 48, 48), (73728, 1, 1536, 32)" in code  # inductor's choice: channels-last
    assert "(8, 32, 48, 48), (73728, 2304, 48, 1)" not in code  # and nothing copied to contiguous


class _SqueezeExcite(nn.Module):
    """What efficientnet's blocks do with a batch norm + SiLU's output: a mean over its pixels
    that scales it (squeeze-excitation, without the excitation's convolutions)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), torch_safebn.SafeBatchNormAct2d(8, act=nn.SiLU())

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * y.mean((2, 3), keepdim=True)


def test_compiled_batch_norm_fuses_with_the_ops_that_read_it():
    """The guard's ops come before the normalization (lowering.py), so inductor computes the
    normalization, the SiLU and the mean and product that read them in one kernel; with the
    guard's ops after the normalization, the SiLU and the mean took a kernel and a pass over
    the activation each."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    torch.manual_seed(0)
    _, codes = run_and_get_code(torch.compile(_SqueezeExcite(), fullgraph=True), torch.randn(4, 8, 10, 10))
    kernels = re.findall(r"^\s+(?:\w+ = )?(cpp_fused\w+)\(", codes[0], re.M)  # the forward's, in order
    assert any(all(op in k for op in ("batch_norm", "silu", "mean", "mul")) for k in kernels), kernels
    assert not any(re.fullmatch(r"cpp_fused_(silu|mean)\w*_\d+", k) for k in kernels), kernels


def _native_and_converted(act):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)]
    native = nn.Sequential(*layers).double()
    if act is not nn.ReLU:  # the fused form, as convert_model makes it from timm's BatchNormAct2d
        native[1] = torch_safebn.SafeBatchNormAct2d(8, act=act()).double()
        native[2] = nn.Identity()
        reference = copy.deepcopy(native)
        reference[1] = nn.Sequential(nn.BatchNorm2d(8), act()).double()
        reference[1][0].load_state_dict(native[1].state_dict())
        return reference, torch_safebn.convert_model(native)
    return native, torch_safebn.convert_model(copy.deepcopy(native))


@pytest.mark.usefixtures("compiled_path")
@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.Hardswish], ids=["relu", "fused_silu", "fused_hardswish"])
def test_compiled_converted_model_trains_as_compiled_native_to_rounding(act):
    """Three SGD steps in float64 under inductor, then an eval forward: outputs, gradients,
    parameters and every buffer of the converted model equal the native model's to rounding."""
    native, safe = _native_and_converted(act)
    runs = []
    for model in (native, safe):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        outputs = []
        for step in range(3):
            x = torch.randn(4 + step, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            output = compiled(x)
            optimizer.zero_grad()
            output.square().mean().backward()
            optimizer.step()
            outputs.append(output.detach())
        model.eval()
        x = torch.randn(3, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        outputs.append(compiled(x))
        runs.append((outputs, list(model.state_dict().values())))
    (native_outputs, native_state), (safe_outputs, safe_state) = runs
    for a, b in zip(native_outputs + native_state, safe_outputs + safe_state, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("compiled_path")
def test_a_nan_batch_in_a_compiled_step_leaves_the_buffers_counts_and_raises():
    """The guard inside the compiled graph: the running statistics and num_batches_tracked keep
    their values, the counters record the skipped update, NonFiniteError names the step, and no
    layer after the one that raised has run its guard (every layer's counters are eager's); the
    next clean batch trains as before."""
    torch._dynamo.reset()
    model, eager = _model(), _model()
    compiled = torch.compile(model, fullgraph=True)
    batches = [torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    batches[1][1, 2, 3, 4] = float("nan")
    compiled(batches[0])
    eager(batches[0])
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    for forward in (compiled, eager):
        with pytest.raises(torch_safebn.NonFiniteError, match="training step 1"):
            forward(batches[1])
    for name, buffer in model.named_buffers():
        if name.endswith("safety_counters"):
            continue
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0, equal_nan=False, msg=name)
    assert [m.safety_counters.tolist() for m in model[1::3]] == [m.safety_counters.tolist() for m in eager[1::3]]
    counters = model[1].safety_counters
    assert counters[Counter.NONFINITE_EVENTS] == 1
    assert counters[Counter.SKIPPED_UPDATES] == 1
    compiled(batches[2])
    assert int(model[1].num_batches_tracked) == 2


@pytest.mark.usefixtures("compiled_path")
def test_compiled_eval_checks_the_running_statistics():
    """In eval mode either compiled graph still checks what it normalizes with: a NaN running_var
    raises as in eager, and the counters say which statistic was at fault."""
    torch._dynamo.reset()
    model = _model().eval()
    model[1].running_var[3] = float("nan")
    with pytest.raises(torch_safebn.NonFiniteError) as compiled_error:
        torch.compile(model, fullgraph=True)(torch.randn(2, 3, 10, 10))
    eager = _model().eval()
    eager[1].running_var[3] = float("nan")
    with pytest.raises(torch_safebn.NonFiniteError) as eager_error:
        eager(torch.randn(2, 3, 10, 10))
    assert str(compiled_error.value) == str(eager_error.value)
    assert model[1].safety_counters.tolist() == eager[1].safety_counters.tolist()


@pytest.mark.usefixtures("compiled_path")
@pytest.mark.parametrize("options", [
    {"momentum": None}, {"track_running_stats": False}, {"affine": False}, {"checks": False},
    {"on_degenerate": "running_stats"}, {"freeze_stats": True}, {"on_nonfinite": "skip"},
], ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()))
def test_compiled_steps_match_eager_under_every_option(options):
    """Each option takes its own branch of either compiled path; compiled (aot_eager: the lowering
    happens while dynamo traces) and eager agree on outputs, input gradients and every buffer,
    counters included, over steps of changing batch sizes, a single example, one value per
    channel (where the option allows it), and an eval step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    native_options = {k: v for k, v in options.items() if k in ("momentum", "track_running_stats", "affine")}
    safety_options = {k: v for k, v in options.items() if k not in native_options}
    native = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, **native_options), nn.ReLU()).double()
    eager = torch_safebn.convert_model(native, **safety_options)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    shapes = [(4, 3, 5, 5), (3, 3, 5, 5), (1, 3, 5, 5)]
    if options.get("on_degenerate") == "running_stats":
        shapes.append((1, 3, 1, 1))
    for step, shape in enumerate(shapes):
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the single example's warning: the same in both
            outputs = [forward(x.clone().requires_grad_()) for forward in (eager, compiled)]
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    eager.eval(), model.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)
    for (name, a), (_, b) in zip(eager.named_buffers(), model.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0, msg=name)


@pytest.mark.usefixtures("compiled_path")
def test_compiled_bfloat16_keeps_float32_statistics():
    """bfloat16 input, float32 buffers (as under autocast): the compiled guard updates the running
    statistics from float32 statistics, as the eager op does, not from ones rounded to bfloat16
    (inductor's CPU decomposition of native_batch_norm returns those)."""
    torch._dynamo.reset()
    eager = torch_safebn.SafeBatchNorm2d(8)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    x = (torch.randn(16, 8, 6, 6) * 3 + 1).to(torch.bfloat16)
    eager(x), compiled(x)
    torch.testing.assert_close(model.running_mean, eager.running_mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.running_var, eager.running_var, rtol=1e-5, atol=1e-7)


def test_compiled_training_refuses_buffers_of_another_size():
    """A module of 3 channels fed 8: the compiled guard refuses the buffers, as eager does, rather
    than reading and writing past their end (without affine parameters nothing else checks)."""
    torch._dynamo.reset()
    model = torch_safebn.SafeBatchNorm2d(3, affine=False)
    for forward in (torch.compile(model, backend="aot_eager"), model):
        with pytest.raises(RuntimeError, match="should contain 8 elements not 3"):
            forward(torch.randn(4, 8, 2, 2))
