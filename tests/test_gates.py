"""A branch already gated is known by its structure, not only by its class name: a module (or the block's own
forward) that multiplies a tensor by a function of that tensor's global pool is an SE, whatever it is called."""

import pytest
import torch
from torch import nn

from se_surgery import SurgeryError, add_se, plan, remove_se, se_blocks
from se_surgery.surgery.layer_types import LayerKind, is_layer

from .models import CenteredSwish, RecalibratedBlock, Recalibration, conv_bn


def net(*blocks: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 1), *blocks)


@pytest.mark.parametrize("pooled", [True, False], ids=["pool-child-sigmoid", "inline-mean-hardsigmoid"])
def test_a_gate_of_an_unknown_name_is_recognised_by_its_structure(pooled):
    gate = Recalibration(16, pooled=pooled)
    assert not is_layer(gate, LayerKind.GATE)  # the registry does not know it: only the structure can tell
    model = net(RecalibratedBlock(16, gate), RecalibratedBlock(16))
    p = plan(model, reduction=4)
    assert [u.owner for u in p.units] == ["2"]  # the plain block gets its SE, the gated one none
    (skip,) = p.skipped
    assert skip.owner == "1" and "already holds an SE / attention gate" in skip.reason
    with pytest.raises(SurgeryError, match="already holds an SE / attention gate"):
        add_se(net(RecalibratedBlock(16, Recalibration(16, pooled=pooled))), reduction=4)


def test_a_gate_written_in_the_block_forward_is_recognised():
    with pytest.raises(SurgeryError, match="already holds an SE / attention gate"):
        add_se(net(RecalibratedBlock(16, inline=True)), reduction=4)  # u * hardsigmoid(fc(u.mean((2, 3))))


def test_pooling_and_multiplying_without_scaling_by_its_own_pool_is_no_gate():
    model = net(RecalibratedBlock(16, CenteredSwish()), RecalibratedBlock(16, nn.Sequential(conv_bn(16, 16))))
    se = add_se(model, reduction=4)
    assert list(se_blocks(se)) == ["1.se", "2.se"]


def test_hugging_face_regnet_y_keeps_its_own_se_and_regnet_x_gets_one_per_block():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    y = transformers.RegNetForImageClassification(transformers.RegNetConfig()).eval()
    assert type(y.regnet.encoder.stages[0].layers[0].layer[2]).__name__ == "RegNetSELayer"
    with pytest.raises(SurgeryError, match="22 sum.s. where its branch already holds an SE / attention gate"):
        add_se(y)
    x_model = transformers.RegNetForImageClassification(transformers.RegNetConfig(layer_type="x")).eval()
    se = add_se(x_model)
    assert len(se_blocks(se)) == sum(x_model.config.depths) == 22
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(remove_se(se).eval()(image).logits, x_model(image).logits)
