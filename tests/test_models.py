import copy

import pytest
import torch

from vdg.models import Branch, ChannelGate, GatedResNet, logistic_straight_through


def tiny(**kw) -> GatedResNet:
    return GatedResNet(width=8, **kw)


def bn_buffers(model: GatedResNet, branch: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if f"norms.{branch}." in k and "running" in k}


def test_feature_dim_and_shapes():
    model = tiny()
    x = torch.randn(4, 3, 32, 32)
    dense = model(x, "dense")
    gated = model(x, Branch.GATED)
    assert dense.features.shape == (4, 64) and dense.masks is None
    assert len(gated.masks) == 8
    assert gated.active_channels().shape == (4, 8)
    assert [m.shape[1] for m in gated.masks] == [8, 8, 16, 16, 32, 32, 64, 64]
    assert GatedResNet().feature_dim == 512


def test_imagenet_stem_shapes():
    out = GatedResNet(width=8, stem="imagenet")(torch.randn(2, 3, 96, 96), "gated")
    assert out.features.shape == (2, 64)


def test_branches_share_convs_not_block_bns():
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    assert "blocks.0.conv1.weight" in names
    assert "blocks.0.bn1.norms.dense.weight" in names and "blocks.0.bn1.norms.gated.weight" in names
    assert "bn1.norms.shared.weight" in names  # stem BN shared (official)
    assert "blocks.2.downsample_bn.norms.shared.weight" in names
    x = torch.randn(8, 3, 32, 32)
    gated_before, dense_before = bn_buffers(model, "gated"), bn_buffers(model, "dense")
    model.train()
    model(x, "dense")
    assert all(torch.equal(v, bn_buffers(model, "gated")[k]) for k, v in gated_before.items())
    assert any(not torch.equal(v, bn_buffers(model, "dense")[k]) for k, v in dense_before.items())
    dense_after = bn_buffers(model, "dense")
    model(x, "gated")
    assert all(torch.equal(v, bn_buffers(model, "dense")[k]) for k, v in dense_after.items())


def test_bn_split_options():
    everything = tiny(bn_split="all")
    assert "bn1.norms.gated.weight" in dict(everything.named_parameters())
    shared = tiny(bn_split="none")
    assert not any("norms.gated" in n for n, _ in shared.named_parameters())
    plain = tiny(branches=["dense"])
    assert plain.blocks[0].gate is None and not plain.gated
    with pytest.raises(ValueError, match="no 'gated' branch"):
        plain(torch.randn(2, 3, 32, 32), "gated")
    with pytest.raises(ValueError, match="allowed values"):
        tiny(bn_split="some")
    with pytest.raises(ValueError, match="allowed values: \\['dense', 'gated'\\]"):
        plain(torch.randn(2, 3, 32, 32), 1)


def test_eval_masks_are_deterministic_and_train_masks_random():
    model = tiny().eval()
    x = torch.randn(6, 3, 32, 32)
    a, b = model(x, "gated"), model(x, "gated")
    assert all(torch.equal(m1, m2) for m1, m2 in zip(a.masks, b.masks, strict=True))
    assert torch.equal(a.features, b.features)
    model.train()
    c, d = model(x, "gated"), model(x, "gated")
    assert any(not torch.equal(m1, m2) for m1, m2 in zip(c.masks, d.masks, strict=True))


def test_all_gates_open_equals_dense_path_through_gated_bns():
    model = tiny()
    with torch.no_grad():  # logits == 0 -> eval mask 1[logit >= 0] == 1 everywhere
        for block in model.blocks:
            block.gate.expand.weight.zero_()
            for norm in ("bn1", "bn2"):
                gated = getattr(block, norm).norms["gated"]
                gated.running_mean.uniform_(-0.5, 0.5)
                gated.running_var.uniform_(0.5, 2.0)
                gated.weight.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    gated_out = model(x, "gated")
    assert all(bool(m.eq(1).all()) for m in gated_out.masks)
    # the same network with the gated BNs copied into the dense slots, run densely
    reference = copy.deepcopy(model)
    state = reference.state_dict()
    for key in list(state):
        if ".norms.gated." in key:
            state[key.replace(".norms.gated.", ".norms.dense.")] = state[key]
    reference.load_state_dict(state)
    torch.testing.assert_close(gated_out.features, reference(x, "dense").features)
    # and it differs from the real dense path, whose BNs hold other statistics
    assert not torch.allclose(gated_out.features, model(x, "dense").features)


def test_closed_gates_zero_conv2_input():
    model = tiny().eval()
    with torch.no_grad():
        for block in model.blocks:
            block.gate.expand.weight.zero_()
            block.gate.expand.register_parameter("bias", None)
    # with weight 0 and no bias the logits are exactly 0, so masks are 1; shift them negative via a hook
    for block in model.blocks:
        block.gate.expand.register_forward_hook(lambda m, i, o: o - 1.0)
    out = model(torch.randn(2, 3, 32, 32), "gated")
    assert int(out.active_channels().sum()) == 0


def test_logistic_straight_through_is_bernoulli_with_sigmoid_gradient():
    torch.manual_seed(0)
    logits = torch.full((200_000,), 0.8, requires_grad=True)
    sample = logistic_straight_through(logits, temperature=2 / 3)
    assert set(sample.detach().unique().tolist()) <= {0.0, 1.0}
    assert abs(sample.detach().mean().item() - torch.sigmoid(torch.tensor(0.8)).item()) < 0.01
    sample.sum().backward()
    assert logits.grad is not None and (logits.grad >= 0).all() and logits.grad.mean() > 0.05


def test_gates_sample_in_float32_under_bf16_autocast():
    """Same input, same seed: the training mask under CPU bf16 autocast is the float32 one. In bf16 the logits
    and the logistic noise were rounded (P(open) biased by ~-0.002, ~0.2% of samples forced off) and the channel
    counts above 256 rounded to even."""
    gate = ChannelGate(64, 300, bias_init=4.0).train()  # ~98% open: ~295 of 300 channels per sample
    x = torch.randn(32, 64, 4, 4)
    torch.manual_seed(0)
    fp32 = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        mixed = gate(x)
        logits = gate.logits(x)
    assert mixed.dtype == logits.dtype == torch.float32
    assert torch.equal(mixed, fp32)
    counts = mixed.sum(dim=1)
    assert torch.equal(counts, mixed.long().sum(dim=1).float())  # exact integers
    assert (counts > 256).all() and (counts % 2 == 1).any()  # odd counts survive

    model = tiny().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 32, 32), "gated")
    assert out.features.dtype == torch.bfloat16 and {m.dtype for m in out.masks} == {torch.float32}


def test_gate_cost_and_bias_option():
    gate = ChannelGate(64, 128)
    assert gate.macs == 64 * 16 + 16 * 128 and gate.expand.bias is None
    biased = ChannelGate(64, 128, bias_init=2.0)
    assert torch.all(biased.expand.bias == 2.0)
    biased.eval()
    with torch.no_grad():
        biased.expand.weight.zero_()
    assert biased(torch.randn(3, 64, 5, 5)).eq(1).all()


def test_arch_config_names_the_architecture():
    cfg = tiny().arch_config()
    assert cfg["width"] == 8 and cfg["stem"] == "cifar" and cfg["branches"] == ["dense", "gated"]
