"""Channel gates (DGNet-style): a squeeze-excitation gating network and the binary logistic-noise sampler.

The gate only decides which channels are kept; it never touches the convolutions it gates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def logistic_straight_through(logits: Tensor, temperature: float) -> Tensor:
    """Binary Gumbel-sigmoid with a straight-through gradient (reference §1.4).

    Forward value: the hard mask 1[logits + n >= 0] with n ~ Logistic(0, 1), i.e. Bernoulli(sigmoid(logits)).
    Backward: the gradient of the relaxed sample sigmoid((logits + n) / temperature). The temperature
    therefore only scales the surrogate gradient; it cannot change which channels are sampled.
    The noise has the dtype of `logits`: pass float32 logits (`ChannelGate` does). In bfloat16, u takes a few
    hundred values, n about 1.7k values capped at +-5.5, and P(open) is biased by about -0.002.
    """
    u = torch.rand_like(logits)
    noise = torch.log(u + 1e-8) - torch.log(1.0 - u + 1e-8)
    soft = torch.sigmoid((logits + noise) / temperature)
    hard = (soft >= 0.5).to(logits.dtype)
    return hard - soft.detach() + soft


class ChannelGate(nn.Module):
    """Gating network W(z) of the paper's Eq. 2 plus its sampler: one mask over `out_channels` per sample.

    GAP(x) -> 1x1 conv (C_in -> C_in / reduction, no bias) -> BN -> ReLU -> 1x1 conv (-> C_out).
    The bottleneck divides the *input* channels, as the official code does. In training the mask is sampled
    with `logistic_straight_through`; in eval it is the deterministic 1[logit >= 0]. The gating network, the
    sampler and the mask are float32 whatever the autocast (bf16 would bias the samples and round the channel
    counts c_i above 256 to even); the gate is a few thousand MACs per sample, so this costs nothing measurable.

    Args:
        in_channels: C_{l-1}, channels of the block input the gate reads.
        out_channels: C_l, channels of conv1's output that the mask multiplies.
        reduction: r in the paper (4).
        temperature: tau of the relaxed sample (official 2/3).
        bias_init: None = the last conv has no bias (official VDG, gates start ~50% open);
            a float adds a bias initialised to it (DGNet uses 2.0, ~88% open).

    Shapes: x [N, C_in, H, W] (any float dtype) -> mask [N, C_out] float32 with values in {0, 1}.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        reduction: int = 4,
        temperature: float = 2.0 / 3.0,
        bias_init: float | None = None,
    ) -> None:
        super().__init__()
        hidden = max(in_channels // reduction, 1)
        self.in_channels, self.out_channels, self.hidden = in_channels, out_channels, hidden
        self.reduction, self.temperature = reduction, temperature
        self.reduce = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.expand = nn.Conv2d(hidden, out_channels, 1, bias=bias_init is not None)
        if bias_init is not None:
            nn.init.constant_(self.expand.bias, bias_init)

    def logits(self, x: Tensor) -> Tensor:
        """Gate logits [N, C_out] in float32 whatever the autocast (in the weights' dtype if those are not)."""
        with torch.autocast(x.device.type, enabled=False):
            # dtype= accumulates in float32 without a float32 copy of x
            z = x.mean(dim=(2, 3), keepdim=True, dtype=torch.float32).to(self.reduce.weight.dtype)
            return self.expand(torch.relu(self.bn(self.reduce(z)))).flatten(1).float()

    def forward(self, x: Tensor) -> Tensor:
        logits = self.logits(x)
        if self.training:
            with torch.autocast(x.device.type, enabled=False):
                return logistic_straight_through(logits, self.temperature)
        return (logits >= 0).float()

    @property
    def macs(self) -> int:
        """Constant cost of the two 1x1 convs on the pooled vector (BN/ReLU/pooling are not counted)."""
        return self.in_channels * self.hidden + self.hidden * self.out_channels
