"""eplb_native: a native dynamic expert-parallel load balancer for MoE inference.

Public API (see README.md and DESIGN.md):
    plan, Plan, Planner, rebalance_experts, preserve_slots      -- placement planning (C++)
    ops (torch.ops.eplb_native.*), backend_info                 -- device ops (registered
                                                                   when eplb_native.ops is
                                                                   first used or imported),
                                                                   which kernel each device runs
    attach, EplbConfig, nn.EPMoE                                -- the updator, its config, and
                                                                   a reference EP MoE layer
"""

from .planner import Plan, Planner, plan, preserve_slots, rebalance_experts

__all__ = ["EplbConfig", "Plan", "Planner", "attach", "backend_info", "nn", "ops", "plan",
           "preserve_slots", "rebalance_experts"]


def __getattr__(name):
    # attach / EplbConfig / nn import torch: loaded on first use so `import eplb_native` (the
    # planner alone) stays light.
    if name == "attach":
        from .updator import attach

        return attach
    if name == "EplbConfig":
        from .config import EplbConfig

        return EplbConfig
    if name == "backend_info":
        from .ops import backend_info

        return backend_info
    if name in ("nn", "ops"):  # (ops: loading it registers torch.ops.eplb_native.*)
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
__version__ = "0.1.0"
