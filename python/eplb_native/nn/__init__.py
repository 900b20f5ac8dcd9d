"""Reference layers: ``EPMoE``, an expert-parallel MoE layer that routes through eplb_native."""

from .epmoe import EPMoE, logical_weights_of_slots

__all__ = ["EPMoE", "logical_weights_of_slots"]
