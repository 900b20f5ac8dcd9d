"""References for the updator's room: a dense MoE (every token through its logical experts,
no placement, no communication)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_moe(x, gate_weight, gate_bias, w13, w2, top_k):
    """x [N, H]; gate_weight [E, H]; gate_bias [E]; w13 [E, 2I, H]; w2 [E, H, I] -> [N, H].
    Softmax over the top-k logits, SwiGLU experts, plain loops."""
    logits = x @ gate_weight.T + gate_bias
    top, ids = logits.topk(top_k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(top_k):
            e = int(ids[n, j])
            gate, up = (w13[e] @ x[n]).chunk(2)
            out[n] += weights[n, j] * (w2[e] @ (F.silu(gate) * up))
    return out
