"""The SE's fused training Function (``surgery/fused_grad.py``) against autograd on the composed ops: gradcheck,
float64 gradients to 1e-12, float32 and bfloat16 within rounding in both layouts, AMP, hooks on the gate, DDP, and a
ResNet-18 training step with the Function switched off."""

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch.func import functional_call

from se_surgery import add_se, se_blocks
from se_surgery.surgery.fused_grad import fused_backward, fused_backward_enabled
from se_surgery.surgery.se_module import SELayer

from .test_fused import bottleneck_net

LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}
ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}
NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def fused_nodes(out: torch.Tensor) -> int:
    """How many of the fused Function's nodes the autograd graph of ``out`` holds."""
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == "_FusedSEBackward"
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return count


def layer(excitation: str = "sigmoid", bias: bool = True, dtype=torch.float64, channels: int = 6) -> SELayer:
    torch.manual_seed(0)
    se = SELayer(channels, 3, excitation=excitation, bias=bias)
    with torch.no_grad():  # gates away from their saturations and kinks
        for p in se.parameters():
            p.copy_(torch.randn_like(p))
    return se.to(dtype)


def reference(se: SELayer, u: torch.Tensor, skip, params: dict) -> torch.Tensor:
    """``skip + u * s`` from standard ops alone, with the fc weights and biases in ``params``."""
    z = u.mean(list(range(2, u.dim())))
    hidden = torch.relu(F.linear(z, params["fc1.weight"].flatten(1), params.get("fc1.bias")))
    s = ACTIVATIONS[se.excitation](F.linear(hidden, params["fc2.weight"].flatten(1), params.get("fc2.bias")))
    s = s.view(list(s.shape) + [1] * (u.dim() - 2))
    return u * s if skip is None else skip + u * s


def inputs(shape=(2, 6, 3, 4), dtype=torch.float64, layout=torch.contiguous_format, skip=True):
    g = torch.Generator().manual_seed(1)
    u, s = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)
            for _ in range(2))
    return u, (s if skip else None)


def gradients(fn, se: SELayer, u: torch.Tensor, skip) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradients of a fixed random projection of ``fn(params, u, skip)`` for u, skip and the fc parameters."""
    params = {k: v.detach().clone().requires_grad_() for k, v in se.named_parameters()}
    u = u.detach().clone().requires_grad_()
    skip = None if skip is None else skip.detach().clone().requires_grad_()
    out = fn(params, u, skip)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    wanted = [u] + ([skip] if skip is not None else []) + list(params.values())
    return list(torch.autograd.grad((out.double() * weight).sum(), wanted)), out


def fused(se):
    return lambda params, u, skip: functional_call(se, params, (u, skip))


def plain(se):
    return lambda params, u, skip: reference(se, u, skip, params)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("excitation", list(ACTIVATIONS))
@pytest.mark.parametrize("with_skip", [True, False])
def test_gradcheck(with_skip, excitation, bias):
    se = layer(excitation, bias)
    u, skip = inputs(skip=with_skip)
    names = [k for k in NAMES if bias or k.endswith("weight")]
    args = [u, skip] + [dict(se.named_parameters())[k] for k in names]
    args = [None if a is None else a.detach().clone().requires_grad_() for a in args]

    def run(u, skip, *params):
        return functional_call(se, dict(zip(names, params)), (u, skip))

    assert fused_nodes(run(*args)) == 1
    assert torch.autograd.gradcheck(run, args)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("excitation", list(ACTIVATIONS))
@pytest.mark.parametrize("with_skip", [True, False])
def test_float64_gradients_are_autograds_to_1e_12(with_skip, excitation, layout):
    se = layer(excitation)
    u, skip = inputs(shape=(3, 6, 5, 7), layout=LAYOUTS[layout], skip=with_skip)
    ours, out = gradients(fused(se), se, u, skip)
    theirs, expected = gradients(plain(se), se, u, skip)
    assert fused_nodes(out) == 1 and fused_nodes(expected) == 0
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert len(ours) == len(theirs) == 5 + with_skip
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if with_skip:
        assert out.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("shape", [(2, 6, 9), (2, 6, 3, 4, 5), (2, 6, 1, 1), (0, 6, 3, 4)])
def test_other_ranks_a_1x1_map_and_an_empty_batch(shape):
    se = layer()
    u, skip = inputs(shape=shape)
    ours, out = gradients(fused(se), se, u, skip)
    theirs, _ = gradients(plain(se), se, u, skip)
    assert fused_nodes(out) == 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_gradients_within_rounding(dtype, rel, layout):
    """Against the float64 figures, the Function's error stays within autograd's plus the dtype's rounding."""
    se = layer(channels=32)
    u, skip = inputs(shape=(4, 32, 6, 6), layout=LAYOUTS[layout])
    exact, _ = gradients(plain(se), se, u, skip)
    low = se.to(dtype)
    ours, out = gradients(fused(low), low, u.to(dtype), skip.to(dtype))
    theirs, _ = gradients(plain(low), low, u.to(dtype), skip.to(dtype))
    assert fused_nodes(out) == 1 and out.dtype == dtype
    for a, b, e in zip(ours, theirs, exact):
        assert a.dtype == dtype
        assert relative_error(a, e) <= 2 * relative_error(b, e) + rel, (relative_error(a, e), relative_error(b, e))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_autocast(layout):
    """Under CPU autocast the excitation runs in bfloat16 and u stays float32: the gradients keep each input's dtype
    and agree with autograd's within bfloat16 rounding."""
    se = layer(channels=32, dtype=torch.float32)
    u, skip = inputs(shape=(4, 32, 6, 6), dtype=torch.float32, layout=LAYOUTS[layout])
    found = []
    for enabled in (True, False):
        with fused_backward(enabled), torch.autocast("cpu", dtype=torch.bfloat16):
            grads, out = gradients(fused(se), se, u, skip)
        assert fused_nodes(out) == enabled
        found.append(grads)
    for a, b in zip(*found):
        assert a.dtype == b.dtype == torch.float32
        assert relative_error(a, b) < 2e-2


def test_only_some_inputs_need_gradients():
    """A frozen SE (only u and skip train) and a frozen trunk (only the SE trains) get autograd's gradients."""
    se = layer()
    u, skip = inputs()
    for frozen in ("se", "trunk"):
        found = []
        for enabled in (True, False):
            with fused_backward(enabled):
                uu = u.clone().requires_grad_(frozen == "se")
                for p in se.parameters():
                    p.requires_grad_(frozen == "trunk")
                out = se(uu, skip)
                wanted = [uu] if frozen == "se" else list(se.parameters())
                found.append(torch.autograd.grad(out.square().sum(), wanted))
                assert fused_nodes(out) == enabled
        for a, b in zip(*found):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_skip_gets_g_itself():
    se = layer()
    u, skip = inputs()
    u.requires_grad_(), skip.requires_grad_()
    seen = []
    skip.register_hook(seen.append)
    g = torch.randn_like(u)
    se(u, skip).backward(g)
    assert seen[0].data_ptr() == g.data_ptr()  # no copy


def test_hooks_on_scale_activation_see_the_gate_while_training():
    se = layer()
    seen = []
    handle = se.scale_activation.register_forward_hook(lambda mod, i, o: seen.append(o))
    u, skip = inputs()
    u.requires_grad_()
    out = se(u, skip)
    assert len(seen) == 1 and seen[0].shape == (2, 6, 1, 1)
    torch.testing.assert_close(seen[0], se.gate(u.detach()), rtol=0, atol=0)
    torch.testing.assert_close(out, skip + u * seen[0], rtol=1e-15, atol=1e-15)
    assert fused_nodes(out) == 0  # watched: autograd's graph, so that s keeps its history
    handle.remove()
    assert fused_nodes(se(u, skip)) == 1  # unwatched: the fused Function


@pytest.mark.parametrize("hook", ["replace", "pre-hook", "regulariser", "global"])
def test_what_a_hook_does_to_the_gate_gets_autograds_gradients(hook):
    # A hook that replaces s, scales the excitation's input, or builds a loss on the s it keeps must get the
    # gradients autograd would give: the Function cannot see what the hook did, so the composed ops run.
    se, kept = layer(), []
    u, skip = inputs()

    def run(params, u, skip):
        out = functional_call(se, params, (u, skip))
        return out + 0.5 * kept.pop().sum() if hook == "regulariser" else out

    if hook == "replace":
        handle = se.scale_activation.register_forward_hook(lambda m, i, o: o * 2)
    elif hook == "pre-hook":
        handle = se.scale_activation.register_forward_pre_hook(lambda m, i: (i[0] / 3,))
    elif hook == "regulariser":
        handle = se.scale_activation.register_forward_hook(lambda m, i, o: kept.append(o))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    with handle:
        got, _ = gradients(run, se, u, skip)
        with fused_backward(False):
            want, _ = gradients(run, se, u, skip)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_double_backward_names_the_switch_and_works_with_it():
    se = layer()
    u, skip = inputs()
    u.requires_grad_()
    (grad_u,) = torch.autograd.grad(se(u, skip).square().sum(), u, create_graph=False)
    with pytest.raises(RuntimeError, match=r"fused_backward\(False\)"):
        torch.autograd.grad(se(u, skip).square().sum(), u, create_graph=True)
    with fused_backward(False):
        (graph_u,) = torch.autograd.grad(se(u, skip).square().sum(), u, create_graph=True)
        graph_u.sum().backward()  # a gradient penalty's second backward
    torch.testing.assert_close(graph_u.detach(), grad_u, rtol=1e-12, atol=1e-12)
    assert u.grad is not None and torch.isfinite(u.grad).all()


def test_torch_func_and_forward_mode_take_the_composed_ops():
    se = layer()
    u, skip = inputs()
    params = dict(se.named_parameters())
    per_param = torch.func.grad(lambda p: functional_call(se, p, (u, skip)).square().sum())(params)
    ref = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    expected = torch.autograd.grad(reference(se, u, skip, ref).square().sum(), list(ref.values()))
    for got, exp in zip(per_param.values(), expected):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)
    tangent = torch.randn_like(u)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(u, tangent)
        jvp = torch.autograd.forward_ad.unpack_dual(se(dual, skip)).tangent
    _, exp_jvp = torch.func.jvp(lambda x: reference(se, x, skip, dict(se.named_parameters())), (u,), (tangent,))
    torch.testing.assert_close(jvp, exp_jvp, rtol=1e-12, atol=1e-12)


def test_eval_and_no_grad_keep_the_plain_path():
    se = layer()
    u, skip = inputs()
    with torch.no_grad():
        kept = u.clone()
        out = se(u, skip, overwrite=True)
        assert out.data_ptr() == u.data_ptr()  # written into u
        torch.testing.assert_close(out, skip + kept * se.gate(kept))
    for p in se.parameters():
        p.requires_grad_(False)
    assert se(u, skip).grad_fn is None  # nothing needs a gradient: the composed ops, no Function
    assert fused_backward_enabled()
    with fused_backward(False):
        assert not fused_backward_enabled()
    assert fused_backward_enabled()


def test_max_squeeze_and_other_modules_use_autograd():
    u, skip = inputs()
    u.requires_grad_()
    assert fused_nodes(SELayer(6, 3, squeeze="max").double()(u, skip)) == 0
    assert fused_nodes(SELayer(6, 3, squeeze="none").double()(u, skip)) == 0
    gelu = layer()
    gelu.activation = torch.nn.GELU()
    assert fused_nodes(gelu(u, skip)) == 0
    assert fused_nodes(layer()(u, skip[:, :1])) == 0  # a broadcast skip


def test_resnet18_training_step_gives_the_plain_gradients():
    torch.manual_seed(0)
    model = add_se(torchvision.models.resnet18(num_classes=5)).train()
    for se in se_blocks(model).values():
        se.reset_parameters()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)
    found = []
    for enabled in (True, False):
        with fused_backward(enabled):
            model.zero_grad()
            out = model(x)
            assert fused_nodes(out) == 8 * enabled
            F.cross_entropy(out, y).backward()
        found.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert len(found[0]) == len(found[1]) > 80
    for k, v in found[0].items():
        assert relative_error(v, found[1][k]) < 1e-5, k


def ddp_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return add_se(bottleneck_net()).to(memory_format=torch.channels_last)


def ddp_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(2, 3, 16, 16, generator=g).contiguous(memory_format=torch.channels_last), torch.arange(2) + rank


def _rank_step(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(ddp_model())
    x, y = ddp_batch(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(x)
        nodes = fused_nodes(out)
        F.cross_entropy(out, y).backward()
    if rank == 0:
        grads = {k: p.grad.numpy() for k, p in model.module.named_parameters()}
        queue.put((grads, nodes, [str(w.message) for w in caught]))
    dist.destroy_process_group()


def test_ddp_averages_the_fused_gradients():
    """Two gloo ranks, channels-last: DDP's reducer takes the Function's fc gradients without a stride warning, and
    the averaged gradients are those of the composed ops on the two batches (to float32 rounding; a conv bias
    before a train-mode BatchNorm has a gradient of rounding noise only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("fork").SimpleQueue()
    mp.start_processes(_rank_step, args=(2, port, queue), nprocs=2, start_method="fork")
    grads, nodes, caught = queue.get()
    assert nodes == 2 and caught == []
    model = ddp_model()
    with fused_backward(False):
        sum(F.cross_entropy(model(x), y) for x, y in map(ddp_batch, (0, 1))).div(2).backward()
    assert grads.keys() == dict(model.named_parameters()).keys()
    for k, p in model.named_parameters():
        torch.testing.assert_close(torch.from_numpy(grads[k]), p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_compile_traces_the_composed_ops_without_a_graph_break():
    """Under torch.compile the SE keeps the composed ops (inductor fuses them itself): one graph, and the
    gradients of the eager Function."""
    torch._dynamo.reset()
    se = layer(dtype=torch.float32)
    u, skip = (t.requires_grad_() for t in inputs(dtype=torch.float32))
    explained = torch._dynamo.explain(se)(u, skip)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    found = []
    for run in (se, torch.compile(se, backend="aot_eager")):
        out = run(u, skip)
        found.append((fused_nodes(out), torch.autograd.grad(out.square().sum(), [u, skip, *se.parameters()])))
    assert [nodes for nodes, _ in found] == [1, 0]
    for a, b in zip(found[0][1], found[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
