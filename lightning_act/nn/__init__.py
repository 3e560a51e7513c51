"""Reusable layers: the GR-KAN group-rational activation, Parametric Mish and the Dopamine gate."""

from lightning_act.nn.dopamine import DopamineGate, adapt_model, firing_fractions, harden, plot_firing_fractions, soften
from lightning_act.nn.group_rational import GroupRational, rational_gain
from lightning_act.nn.pmish import PMish, pmish

__all__ = [
    "DopamineGate",
    "GroupRational",
    "PMish",
    "adapt_model",
    "firing_fractions",
    "harden",
    "plot_firing_fractions",
    "pmish",
    "rational_gain",
    "soften",
]
