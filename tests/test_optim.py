import copy
import math

import pytest
import torch
from torch import nn

from vdg.methods import build_method
from vdg.optim import LARS, lars_param_groups, warmup_cosine


def reference_lars_step(params, groups, lr, momentum, eta, clip, bufs):
    """Per-tensor loop of the official LARS-wrapped SGD (reference §1.9), for comparison."""
    for group in groups:
        for p in group["params"]:
            if p.grad is None:  # torch optimizers skip such tensors entirely (no state, no decay)
                continue
            g = p.grad.clone()
            wd = group["weight_decay"]
            if group["lars"]:
                w_norm, g_norm = p.norm(), g.norm()
                if w_norm != 0 and g_norm != 0:
                    trust = eta * w_norm / (g_norm + wd * w_norm + 1e-8)
                    if clip:
                        trust = min(trust / lr, 1.0)
                    g = (g + wd * p) * trust
            key = id(p)
            bufs[key] = g if key not in bufs else momentum * bufs[key] + g
            p.data -= lr * bufs[key]


@pytest.mark.parametrize("clip", [True, False])
def test_lars_equals_reference_loop(clip):
    torch.manual_seed(0)

    class Gate(nn.Conv2d):
        """Stands for a gating network: its parameters get LARS without weight decay."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
            self.gate = Gate(8, 8, 1)
            self.head = nn.Linear(8 * 6 * 6, 4)

        def forward(self, x):
            return self.head(torch.flatten(self.gate(self.body(x)), 1))

    model = Tiny()
    reference = [p.detach().clone() for p in model.parameters()]
    groups = lars_param_groups([("", model)], weight_decay=1e-2, no_decay_modules=(Gate,))
    assert [g["name"] for g in groups] == ["decay", "gates", "bias_and_norm"]
    opt = LARS(groups, lr=0.5, momentum=0.9, eta=0.02, clip_lr=clip)
    ref_params = [nn.Parameter(r) for r in reference]
    by_id = {id(p): r for p, r in zip(model.parameters(), ref_params, strict=True)}
    ref_groups = [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in groups]
    bufs: dict = {}
    for _ in range(3):
        x = torch.randn(5, 3, 8, 8)
        for params in (list(model.parameters()), ref_params):
            for p in params:
                p.grad = None
        model(x).pow(2).mean().backward()
        for p, r in zip(model.parameters(), ref_params, strict=True):
            r.grad = p.grad.clone()
        opt.step()
        with torch.no_grad():
            reference_lars_step(ref_params, ref_groups, 0.5, 0.9, 0.02, clip, bufs)
    for p, r in zip(model.parameters(), ref_params, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", [True, False])
def test_lars_with_missing_grads_zero_norms_and_decay_on_excluded_groups(clip):
    """Edge cases of one step function against the reference loop, over steps where the set of tensors with a
    gradient changes (so some momentum buffers are new while others continue)."""
    torch.manual_seed(0)
    shapes = {"w": (4, 3), "zero_w": (4, 3), "zero_g": (5,), "no_grad": (2, 2), "late": (3, 3), "bias": (4,)}
    params = {k: nn.Parameter(torch.randn(shape)) for k, shape in shapes.items()}
    with torch.no_grad():
        params["zero_w"].zero_()

    def groups(tensors: dict) -> list[dict]:
        lars = [tensors[k] for k in ("w", "zero_w", "zero_g", "no_grad", "late")]
        # an excluded group that asks for weight decay still gets none (the official wrapper's behaviour)
        return [
            {"params": lars, "weight_decay": 1e-2, "lars": True},
            {"params": [tensors["bias"]], "weight_decay": 0.5, "lars": False},
        ]

    ref = {k: nn.Parameter(p.detach().clone()) for k, p in params.items()}
    opt = LARS(groups(params), lr=0.3, momentum=0.9, eta=0.02, clip_lr=clip)
    bufs: dict = {}
    for step in range(3):
        for k in params:
            grad = None
            if k == "zero_g":
                grad = torch.zeros(shapes[k])
            elif k != "no_grad" and not (k == "late" and step == 0):
                grad = torch.randn(shapes[k])
            params[k].grad, ref[k].grad = grad, None if grad is None else grad.clone()
        opt.step()
        with torch.no_grad():
            reference_lars_step(ref.values(), groups(ref), 0.3, 0.9, 0.02, clip, bufs)
    for k in params:
        torch.testing.assert_close(params[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert params["no_grad"] not in opt.state and torch.equal(params["no_grad"], ref["no_grad"])
    assert torch.equal(params["zero_g"], ref["zero_g"])  # zero gradient: no LARS, no decay, no move


def test_excluded_tensors_get_no_weight_decay():
    bias = nn.Parameter(torch.ones(3))
    bias.grad = torch.zeros(3)
    opt = LARS([{"params": [bias], "weight_decay": 0.0, "lars": False}], lr=1.0, weight_decay=0.5)
    opt.step()
    assert torch.equal(bias, torch.ones(3))


def test_warmup_cosine_official_per_epoch_values():
    lr = lambda e: warmup_cosine(e, warmup=10, total=500, start_lr=0.003, base_lr=0.6, min_lr=0.0)  # noqa: E731
    assert lr(0) == pytest.approx(0.003)
    assert lr(9) == pytest.approx(0.6)
    assert lr(5) == pytest.approx(0.003 + 5 * (0.6 - 0.003) / 9)
    assert lr(10) == pytest.approx(0.6)
    assert lr(255) == pytest.approx(0.3)
    assert lr(500) == pytest.approx(0.0, abs=1e-12)
    assert lr(499) == pytest.approx(0.6 * 0.5 * (1 + math.cos(math.pi * 489 / 490)))


def test_lars_resumes_from_its_state_dict():
    """Momentum buffers go through state_dict: a reloaded optimizer continues exactly as the original."""
    torch.manual_seed(0)
    grads = [torch.randn(6, 4) for _ in range(3)]

    def make(w: nn.Parameter) -> LARS:
        return LARS([{"params": [w], "weight_decay": 1e-2, "lars": True}], lr=0.3, momentum=0.9)

    w = nn.Parameter(torch.randn(6, 4))
    opt = make(w)
    for g in grads[:2]:
        w.grad = g.clone()
        opt.step()
    resumed = nn.Parameter(w.detach().clone())
    reloaded = make(resumed)
    reloaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    for param, optimizer in ((w, opt), (resumed, reloaded)):
        param.grad = grads[2].clone()
        optimizer.step()
    assert torch.equal(w, resumed)


# ----- which parameters get weight decay ------------------------------------------------------------------------
def group_names(model: nn.Module, exclude_bias_n_norm: bool) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = lars_param_groups([(n, m) for n, m in model.named_children() if n != "probes"], 1e-4, exclude_bias_n_norm)
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}


def test_weight_decay_goes_to_everything_but_the_gating_networks_under_both_settings(tiny_cfg):
    """The gates are matched by module type: the gated branch's BatchNorms (norms.gated.*) keep their decay."""
    model = build_method(tiny_cfg())
    everything = {n for n, _ in model.named_parameters() if not n.startswith("probes.")}
    gate_params = ("reduce.weight", "bn.weight", "bn.bias", "expand.weight")
    gates = {f"backbone.blocks.{b}.gate.{p}" for b in range(8) for p in gate_params}
    one_d = {n for n, p in model.named_parameters() if p.ndim == 1 and not n.startswith("probes.")}
    gated_bns = {n for n in everything if ".norms.gated." in n}
    assert len(gated_bns) == 32  # BN1 and BN2 of 8 blocks, weight and bias

    official = group_names(model, exclude_bias_n_norm=True)  # the default
    assert official["gates"] == gates - one_d  # the gates' 1x1 conv weights
    assert official["bias_and_norm"] == one_d
    assert official["decay"] == everything - gates - one_d

    plain = group_names(model, exclude_bias_n_norm=False)
    assert plain["gates"] == gates
    assert plain["decay"] == everything - gates
    assert gated_bns <= plain["decay"] and "bias_and_norm" not in plain
    assert {"backbone.conv1.weight", "projector.0.bias", "projector.1.weight"} <= plain["decay"]


# ----- LARS on CUDA: fused foreach kernels ----------------------------------------------------------------------
def test_lars_trust_ratios_are_applied_as_same_shaped_tensors(monkeypatch):
    """CUDA fuses `_foreach_mul` over a list only when both operand lists hold tensors of equal shapes and strides;
    0-d per-tensor factors sent it down the slow path, one kernel per parameter."""
    shapes = []
    real = {name: getattr(torch, name) for name in ("_foreach_mul", "_foreach_mul_")}

    def spy(name):  # noqa: ANN001, ANN202
        def call(tensors, others):  # noqa: ANN001, ANN202
            if isinstance(others, list | tuple):
                shapes.extend((t.shape, t.stride(), o.shape, o.stride()) for t, o in zip(tensors, others, strict=True))
            return real[name](tensors, others)

        return call

    for name in real:
        monkeypatch.setattr(torch, name, spy(name))
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    params = [conv.weight, nn.Parameter(torch.randn(5, 7)), nn.Parameter(torch.randn(4))]
    for p in params:
        p.grad = torch.randn_like(p)
    for wd in (0.0, 1e-2):
        shapes.clear()
        before = [p.detach().clone() for p in params]
        LARS([{"params": params, "weight_decay": wd, "lars": True}], lr=0.5, weight_decay=wd).step()
        assert len(shapes) == len(params)
        assert all(t_shape == o_shape and t_stride == o_stride for t_shape, t_stride, o_shape, o_stride in shapes)
        assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: counts the kernels of a LARS step")
def test_lars_step_launches_a_few_kernels_not_a_few_per_parameter():
    params = [nn.Parameter(torch.randn(32, 32, 3, 3, device="cuda")) for _ in range(200)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = LARS([{"params": params, "weight_decay": 1e-4, "lars": True}], lr=0.5, weight_decay=1e-4)
    opt.step()  # creates the momentum buffers
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # fused foreach kernels take up to a few dozen tensors per launch: ~50 kernels here, > 200 per-tensor ones
    assert len(kernels) < len(params) // 2, [e.name for e in kernels]
