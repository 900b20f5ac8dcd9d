"""EPLB on a Hugging Face transformers MoE model under transformers' expert parallelism.

A small Qwen3-MoE is built from its config (random weights, router biased so experts 0-2 are
hot), saved, and loaded on 2 CPU ranks (gloo) with transformers' own expert parallelism;
``eplb_native.integrations.transformers.attach`` adds 2 redundant slots per layer and the
updator rebalances every few forwards. Each rank also runs the same weights in one process
without EPLB and compares the logits at every step.

    pip install --no-build-isolation '.[transformers]'   # in the checkout, torch installed first
    python examples/transformers_moe.py            # spawns 2 processes

On GPUs the same code runs with ``backend="nccl"`` and the model on ``cuda:{rank}``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NUM_RANKS, EXPERTS, REDUNDANT = 2, 8, 2


@torch.no_grad()
def build(path: str) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                            moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, num_experts=EXPERTS,
                            num_experts_per_tok=2, max_position_embeddings=64)
    model = Qwen3MoeForCausalLM(config)
    # Skew: every token embedding carries a direction u that the routers of experts 0-2 favour.
    u = torch.nn.functional.normalize(torch.randn(64), dim=0)
    model.get_input_embeddings().weight.add_(0.3 * u)
    for layer in model.model.layers:
        for e, bias in zip((0, 1, 2), (0.08, 0.05, 0.03), strict=True):
            layer.mlp.gate.weight[e].add_(bias * u)
    model.save_pretrained(path)


@torch.no_grad()
def run(rank: int, path: str, steps: int, init_method: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(NUM_RANKS), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=NUM_RANKS)
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import eplb_native
    from eplb_native.integrations import transformers as eplb_tf

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32,
        distributed_config=DistributedConfig(tp_size=NUM_RANKS, ep_size=NUM_RANKS,
                                             tp_plan="auto"))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = eplb_native.EplbConfig(num_redundant_experts=REDUNDANT,
                                    expert_heat_collection_interval=4,
                                    algorithm_execution_interval=0, use_async=False)
    updator = eplb_tf.attach(model, config)
    worst = 0.0
    for step in range(steps):
        ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(step))
        logits = model(ids).logits  # one updator step per forward (hooks)
        worst = max(worst, (logits - reference(ids).logits).abs().max().item())
    windows = [w["balancedness"] for w in updator.stats.windows]
    if rank == 0:
        slots = model.model.layers[0].mlp.experts.num_experts
        print(f"slots per rank: {EXPERTS // NUM_RANKS} -> {slots}")
        for i, b in enumerate(windows):
            print(f"window {i}: balancedness per layer {[round(float(x), 3) for x in b]}")
        print(f"balancedness before {windows[0].mean():.3f} -> after {windows[-1].mean():.3f}")
        print(f"placement now: {updator.phy2log().tolist()}")
        print(f"max |logits - logits without EPLB| over {steps} steps: {worst:.2e} "
              f"({'unchanged' if worst < 1e-4 else 'CHANGED'})")
    updator.shutdown()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as path:
        build(path)
        # a rendezvous file fresh to this run: no fixed port that another job may hold
        init_method = f"file://{os.path.join(path, 'rdzv')}"
        mp.spawn(run, args=(path, args.steps, init_method), nprocs=NUM_RANKS)


if __name__ == "__main__":
    main()
