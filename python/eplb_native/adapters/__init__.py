"""How ``eplb_native.attach`` finds MoE layers: the protocol (``base``) and built-in adapters.

See ``adapters/base.py`` for what a layer must expose.
"""

from . import fused  # noqa: F401  (registers the fused-layout adapter)
from .base import AdapterError, MoELayerAdapter, adapt_module, register_adapter, registered_adapters

__all__ = ["AdapterError", "MoELayerAdapter", "adapt_module", "register_adapter",
           "registered_adapters"]
