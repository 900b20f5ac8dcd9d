"""eplb_native: a native dynamic expert-parallel load balancer for MoE inference.

Public API (see README.md and DESIGN.md):
    plan, Plan, Planner, rebalance_experts, preserve_slots      -- placement planning (C++)
    ops (torch.ops.eplb_native.*)                               -- device ops
"""

from .planner import Plan, Planner, plan, preserve_slots, rebalance_experts

__all__ = ["Plan", "Planner", "plan", "preserve_slots", "rebalance_experts"]
__version__ = "0.1.0"
