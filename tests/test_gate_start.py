"""``start_gates``: identity-initialised SE blocks start at s0 with the BatchNorm before them divided by s0, so a
pretrained network computes what it did, and the gates sit where the sigmoid's slope lets them learn."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import se_surgery.surgery.gate_start as gate_start
from se_surgery import add_se, se_blocks
from se_surgery.surgery.gate_start import start_gates

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _pretrained_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():  # "pretrained": BatchNorms that are not at their init
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("train_mode", [False, True])
def test_outputs_are_kept_and_the_gates_start_at_s0(train_mode):
    plain = _pretrained_resnet18()
    se = add_se(copy.deepcopy(plain), init="identity", example_input=X)
    before_bn2 = se.layer1[0].bn2.weight.detach().clone()
    started = start_gates(se, 0.5, X)
    assert sorted(started) == sorted(se_blocks(se)) and len(started) == 8
    assert torch.equal(se.layer1[0].bn2.weight.detach(), before_bn2 / 0.5)
    assert all(torch.equal(b.fc2.bias.detach(), torch.zeros_like(b.fc2.bias)) for b in se_blocks(se).values())
    plain.train(train_mode)
    se.train(train_mode)
    with torch.no_grad():
        want, got = plain(X), se(X)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # identity init alone is off by up to 5e-5 per gate
    gates = []
    hook = se.layer1[0].se.scale_activation.register_forward_hook(lambda m, i, o: gates.append(o))  # s itself
    with torch.no_grad():
        se(X)
    hook.remove()
    torch.testing.assert_close(gates[0], torch.full_like(gates[0], 0.5))


def test_a_gate_that_no_batchnorm_feeds_stays_at_one():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.SiLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    se = add_se(plain, init="identity", example_input=X, reduction=4)
    assert len(se_blocks(se)) == 2
    assert start_gates(se, 0.5, X) == []  # SiLU(x / s0) is not SiLU(x) / s0
    assert all(float(b.fc2.bias.detach().min()) == 10.0 for b in se_blocks(se).values())


def test_only_a_batchnorm_that_reaches_the_se_unchanged_counts():
    """A ReLU (in place or not) passes a BatchNorm's output on; an in-place SiLU changes it, so its SE keeps s = 1."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(inplace=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    se = add_se(copy.deepcopy(plain), init="identity", example_input=X, reduction=4).eval()
    (first, second) = sorted(se_blocks(se))
    assert start_gates(se, 0.5, X) == [first]
    assert float(se_blocks(se)[second].fc2.bias.detach().min()) == 10.0
    assert start_gates(se, 0.5, X) == []  # a gate already started is not started twice
    with torch.no_grad():
        torch.testing.assert_close(se(X), plain(X), rtol=1e-4, atol=1e-4)


def test_some_blocks_start_and_the_rest_keep_identity_init():
    """``position="identity"``: the SE on a block's identity path is fed by the downsample's BatchNorm in the 3
    down-sampling blocks and by the previous block's sum elsewhere."""
    plain = _pretrained_resnet18().eval()
    se = add_se(copy.deepcopy(plain), init="identity", position="identity", example_input=X).eval()
    started = start_gates(se, 0.5, X)
    assert sorted(started) == ["layer2.0.se", "layer3.0.se", "layer4.0.se"]
    assert all(float(b.fc2.bias.detach().min()) == 10.0 for n, b in se_blocks(se).items() if n not in started)
    with torch.no_grad():
        torch.testing.assert_close(se(X), plain(X), rtol=1e-3, atol=1e-3)  # the 5 others: identity init's 5e-5


def test_an_input_the_model_cannot_run_changes_nothing():
    se = add_se(_pretrained_resnet18(), init="identity", example_input=X)
    state = copy.deepcopy(se.state_dict())
    assert start_gates(se, 0.5, torch.zeros(1, 1, 32, 32)) == []  # one channel for a 3-channel stem
    assert all(torch.equal(state[k], v) for k, v in se.state_dict().items())


def test_changed_outputs_undo_every_change(monkeypatch):
    se = add_se(_pretrained_resnet18(), init="identity", example_input=X)
    state = copy.deepcopy(se.state_dict())
    monkeypatch.setattr(gate_start, "_same", lambda a, b: False)
    assert start_gates(se, 0.5, X) == []
    assert all(torch.equal(state[k], v) for k, v in se.state_dict().items())


def test_he_initialised_or_trained_gates_are_left_alone():
    se = add_se(_pretrained_resnet18(), example_input=X)  # He init: fc2 is not 0
    state = copy.deepcopy(se.state_dict())
    assert start_gates(se, 0.5, X) == [] and start_gates(se, 1.0, X) == []
    assert all(torch.equal(state[k], v) for k, v in se.state_dict().items())
    with pytest.raises(ValueError, match="must be in"):
        start_gates(se, 0.0, X)
