"""Reusable layers: the GR-KAN group-rational activation, Parametric Mish and the Dopamine gate."""

from lightning_act.nn.group_rational import GroupRational, rational_gain
from lightning_act.nn.pmish import PMish, pmish

__all__ = ["GroupRational", "PMish", "pmish", "rational_gain"]
