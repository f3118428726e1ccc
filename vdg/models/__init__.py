"""Backbones: the gated ResNet-18, its gates, named branches and analytic FLOPs."""

from vdg.models.branch import Branch
from vdg.models.flops import BlockCost, NetworkCost, network_cost
from vdg.models.gates import ChannelGate, logistic_straight_through
from vdg.models.heads import mlp_projector
from vdg.models.resnet import BackboneOutput, BranchNorm, GatedBasicBlock, GatedResNet

__all__ = [
    "Branch",
    "BlockCost",
    "NetworkCost",
    "network_cost",
    "ChannelGate",
    "logistic_straight_through",
    "BackboneOutput",
    "BranchNorm",
    "GatedBasicBlock",
    "GatedResNet",
    "mlp_projector",
]
