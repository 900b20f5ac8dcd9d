"""Device ops: ``torch.ops.eplb_native.*`` (schemas in csrc/ops/registration.cpp).

Importing this module loads the native library, which registers the ops for every backend it
was built with.
"""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (registers torch.ops.eplb_native)

map_and_record = torch.ops.eplb_native.map_and_record
record_counts = torch.ops.eplb_native.record_counts
record_topk = torch.ops.eplb_native.record_topk
