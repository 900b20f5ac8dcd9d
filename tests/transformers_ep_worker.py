"""Multi-process scenario of the transformers integration (spawned by
tests/test_transformers_integration.py, one process per rank, gloo on CPU).

For each family a tiny model is built from its config class (fixed seed), its gate biased so a
few experts are hot (a shared direction ``u`` added to every token embedding and to the router
rows of the hot experts), and saved. Every rank loads it twice: with transformers' expert
parallelism plus ``eplb_native.integrations.transformers.attach`` (redundant slots, updator
rebalancing every ``INTERVAL`` steps), and in one process without EPLB (the reference). Each
rank returns, per family, what the test asserts on: logits of both at every step, the load the
layers recorded against the router's top-k ids, slot weights against the reference experts,
the maps, and the updator's balancedness history. Nothing here asserts: a family that raises
returns its traceback.
"""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
from mp_exit import leave

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss")
NUM_RANKS = 2
EXPERTS, REDUNDANT, TOP_K, HIDDEN, LAYERS = 8, 2, 2, 64, 2
# Two phases of traffic, each with its own hot experts, so the updator rebalances more than once:
# tokens < VOCAB / 2 carry direction u_a (hot: experts 0, 1, 2, loaded on rank 0), tokens
# >= VOCAB / 2 carry u_b (hot: experts 5, 6, 7, loaded on rank 1).
HOT = ((0, 1, 2), (5, 6, 7))
BIAS = (0.08, 0.05, 0.03)  # router-row bias of the hottest .. least hot expert of a phase
#: transformers EP implementation each family is loaded with (attach wraps it): "auto" picks
#: all_reduce here (the ranks share the batch); mixtral covers the token-exchanging one.
EP_IMPLEMENTATION = {"mixtral": "all_to_all"}
STEPS, INTERVAL = 12, 2  # steps 0..5 phase a, 6..11 phase b
BATCH, SEQ, VOCAB = 2, 12, 128


def family_config(family: str):
    """The tiny config of ``family`` (hidden 64, 2 layers, 8 experts, top-2)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  num_experts_per_tok=TOP_K, tie_word_embeddings=False)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=16, intermediate_size=128,
                                 moe_intermediate_size=32, num_experts=EXPERTS)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32,
                                 num_experts=EXPERTS, shared_expert_intermediate_size=64)
    if family == "mixtral":
        return tf.MixtralConfig(**common, head_dim=16, intermediate_size=32,
                                num_local_experts=EXPERTS)
    if family == "deepseek_v3":
        # grouped routing: 4 groups of 2 experts, tokens pick within 2 groups; 1 shared expert
        return tf.DeepseekV3Config(**common, intermediate_size=128, moe_intermediate_size=32,
                                   n_routed_experts=EXPERTS, n_shared_experts=1, n_group=4,
                                   topk_group=2, first_k_dense_replace=0, kv_lora_rank=16,
                                   q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
                                   qk_nope_head_dim=8)
    if family == "gpt_oss":
        return tf.GptOssConfig(**common, head_dim=16, intermediate_size=32,
                               num_local_experts=EXPERTS, sliding_window=16)
    raise KeyError(family)


def router_of(block: torch.nn.Module) -> torch.nn.Module:
    """The router of an MoE block (``gate``; ``router`` for GPT-OSS)."""
    return block.router if hasattr(block, "router") else block.gate


@torch.no_grad()
def build_checkpoint(family: str, path: str) -> None:
    """Builds the tiny model of ``family`` (seed 0), biases its gate towards HOT, saves it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family), dtype=torch.float32)
    embed = model.get_input_embeddings().weight
    for phase, hot in enumerate(HOT):
        u = torch.nn.functional.normalize(torch.randn(HIDDEN), dim=0)
        half = VOCAB // 2
        embed[phase * half:(phase + 1) * half].add_(0.3 * u)
        for module in model.modules():
            if hasattr(module, "experts"):
                for e, bias in zip(hot, BIAS, strict=True):
                    router_of(module).weight[e].add_(bias * u)
    model.save_pretrained(path)


def _inputs(step: int) -> torch.Tensor:
    # the same tokens on every rank: with tp_size == ep_size the ranks share the batch
    g = torch.Generator().manual_seed(7 + step)
    phase = 0 if step < STEPS // 2 else 1
    half = VOCAB // 2
    return torch.randint(phase * half, (phase + 1) * half, (BATCH, SEQ), generator=g)


def mismatched_slots(layers, ref, rank: int) -> list[tuple[str, str, int, int]]:
    """(layer, parameter, local slot, logical expert) of every local slot whose rows differ
    (bit for bit) from the reference model's logical expert."""
    ref_blocks = [m for m in ref.modules() if hasattr(m, "experts")]
    out = []
    for layer, ref_block in zip(layers, ref_blocks, strict=True):
        phy2log = layer.experts.eplb_phy2log
        slots = layer.experts.num_experts
        for pname, p in layer.experts.named_parameters(recurse=False):
            full, local = getattr(ref_block.experts, pname), p.to_local()
            for slot in range(slots):
                e = int(phy2log[rank * slots + slot])
                if not torch.equal(local[slot], full[e]):
                    out.append((layer.name, pname, slot, e))
    return out


@torch.no_grad()
def run_family(family: str, path: str, rank: int) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import eplb_native
    from eplb_native.integrations import transformers as eplb_tf

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32,
        distributed_config=DistributedConfig(
            tp_size=NUM_RANKS, ep_size=NUM_RANKS, tp_plan="auto",
            ep_implementation=EP_IMPLEMENTATION.get(family, "auto")))
    layers = eplb_tf.find_moe_layers(model)
    before_slots = layers[0].experts.num_experts

    # router top-k ids and the layers' recorded load, captured before the updator folds it
    # (this hook is registered before attach's, so it runs first)
    routed: list[list[torch.Tensor]] = []
    recorded: list[list[torch.Tensor]] = []
    for layer in layers:
        router_of(layer.block).register_forward_hook(
            lambda mod, args, out: routed[-1].append(out[2].detach().clone()))
    model.register_forward_hook(lambda *_: recorded.append(
        [(lay.experts.eplb_phy2log.clone(), lay.experts.eplb_load.clone()) for lay in layers]))

    config = eplb_native.EplbConfig(num_redundant_experts=REDUNDANT,
                                    expert_heat_collection_interval=INTERVAL,
                                    algorithm_execution_interval=0, layers_per_step=1,
                                    use_async=False, policy="balanced")
    updator = eplb_native.attach(model, config)  # delegates to the transformers integration
    out = {"slots_before": before_slots, "slots_after": layers[0].experts.num_experts,
           "inner": type(layers[0].experts.eplb_ep_implementation.inner).__name__,
           "mismatched_initial": mismatched_slots(layers, ref, rank),
           "num_groups": updator.config.num_groups,
           "logits": [], "ref_logits": [], "load": [], "router_count": [], "phy2log": []}
    try:
        for step in range(STEPS):
            ids = _inputs(step)
            routed.append([])
            out["logits"].append(model(ids).logits.clone())
            out["ref_logits"].append(ref(ids).logits.clone())
            # load folded to logical experts, summed over the EP group
            load = torch.stack([torch.zeros(EXPERTS, dtype=torch.int64).scatter_add_(0, p2l, rec)
                                for p2l, rec in recorded[-1]])
            dist.all_reduce(load)
            out["load"].append(load)
            out["router_count"].append(torch.stack(
                [torch.bincount(ids_.reshape(-1), minlength=EXPERTS) for ids_ in routed[-1]]))
            out["phy2log"].append(torch.from_numpy(updator.phy2log()))
        # greedy decoding with the KV cache: every decode forward is an updator step too
        prompt = _inputs(STEPS)[:1]
        out["generated"] = model.generate(prompt, max_new_tokens=6, do_sample=False)
        out["ref_generated"] = ref.generate(prompt, max_new_tokens=6, do_sample=False)
        out["mismatched_slots"] = mismatched_slots(layers, ref, rank)
        out["maps"] = [(lay.experts.eplb_phy2log.clone(), lay.experts.eplb_log2phy.clone(),
                        lay.experts.eplb_logcnt.clone()) for lay in layers]
        out["windows"] = [w["balancedness"].copy() for w in updator.stats.windows]
        out["plans"] = [(p["balancedness_before"].copy(), p["balancedness_after"].copy())
                        for p in updator.stats.plans]
        out["moves_ok"] = [m["ok"] for m in updator.stats.moves]
        # save_pretrained after the moves: the plain model loads it and gives the reference's
        # logits (the grown, slot-ordered parameters are saved in logical order)
        saved = f"{path}_saved"
        model.save_pretrained(saved, is_main_process=rank == 0)
        dist.barrier()
        reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
        ids = _inputs(STEPS + 1)
        out["reloaded_logits"], out["reloaded_ref_logits"] = reloaded(ids).logits, ref(ids).logits
    finally:
        updator.shutdown()
    return out


#: A vllm-ascend expert map for the qwen3_moe checkpoint: 6 slots per rank, ranks holding
#: experts the loaded layout put on the other rank, and replicas.
EXPERT_MAP_SLOTS = (((7, 6, 5, 4, 0, 1), (3, 2, 1, 0, 5, 4)),   # layer 0: rank 0, rank 1
                    ((6, 5, 4, 0, 1, 7), (4, 5, 0, 1, 2, 3)))   # layer 1
EXPERT_MAP = {"moe_layer_count": LAYERS, "layer_list": [
    {"layer_id": layer, "device_count": NUM_RANKS,
     "device_list": [{"device_id": r, "device_expert": list(EXPERT_MAP_SLOTS[layer][r])}
                     for r in range(NUM_RANKS)]}
    for layer in range(LAYERS)]}


def _prepare_with_bad_last_layer(model, eplb_tf) -> str | None:
    """prepare() on ``model`` whose last MoE layer has one expert row too many per rank (and
    claims EXPERTS logical experts): it must refuse before growing the earlier layers. The
    last layer is restored afterwards. Returns the error message (None if not refused)."""
    from torch.distributed.tensor import DTensor, Shard

    experts = eplb_tf.find_moe_layers(model)[-1].experts
    saved = dict(experts._parameters)
    for name, p in saved.items():
        if p is None or p.dim() == 0:
            continue
        local = p.to_local()
        grown = DTensor.from_local(torch.cat([local, local[:1]]), p.device_mesh, [Shard(0)],
                                   run_check=False)
        experts._parameters[name] = torch.nn.Parameter(grown, requires_grad=p.requires_grad)
    experts.eplb_num_logical_experts = EXPERTS
    try:
        eplb_tf.prepare(model)
        return None
    except ValueError as e:
        return str(e)
    finally:
        experts._parameters.update(saved)
        del experts.eplb_num_logical_experts


def _attach_with_narrow_last_layer(model, eplb_native, eplb_tf) -> str | None:
    """attach() on ``model`` whose last MoE layer's experts are narrower (another intermediate
    size): dynamic EPLB moves every layer through the same buffers, so it must refuse before
    growing any layer. The last layer is restored afterwards. Returns the error message."""
    from torch.distributed.tensor import DTensor, Shard

    experts = eplb_tf.find_moe_layers(model)[-1].experts
    saved = dict(experts._parameters)
    for name, p in saved.items():
        if p is None or p.dim() < 2:
            continue
        local = p.to_local()
        narrow = DTensor.from_local(local[..., :-1].contiguous(), p.device_mesh, [Shard(0)],
                                    run_check=False)
        experts._parameters[name] = torch.nn.Parameter(narrow, requires_grad=p.requires_grad)
    try:
        eplb_native.attach(model, {"num_redundant_experts": 2}, hooks=False)
        return None
    except ValueError as e:
        return str(e)
    finally:
        experts._parameters.update(saved)


@torch.no_grad()
def run_prepare_checks(path: str, rank: int) -> dict:
    """prepare() alone (no updator) on the qwen3_moe checkpoint: refused inputs leave the model
    untouched; an expert map places every slot; outputs stay those of the reference."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import eplb_native
    from eplb_native.integrations import transformers as eplb_tf

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32,
        distributed_config=DistributedConfig(tp_size=NUM_RANKS, ep_size=NUM_RANKS,
                                             tp_plan="auto"))
    out = {"errors": {}}
    bad = {"uneven_slots": dict(num_redundant_experts=1),
           "negative_redundant": dict(num_redundant_experts=-1),
           "map_layers": dict(expert_map=[[0, 1, 2, 3, 4, 5, 6, 7]]),
           "map_missing_expert": dict(expert_map=[[0, 1, 2, 3, 4, 5, 6, 6]] * LAYERS),
           "ep_implementation": dict(ep_implementation="eplb"),
           "map_vs_redundant": dict(expert_map=EXPERT_MAP, num_redundant_experts=2)}
    for key, kwargs in bad.items():
        try:
            eplb_tf.prepare(model, **kwargs)
            out["errors"][key] = None
        except ValueError as e:
            out["errors"][key] = str(e)
    out["errors"]["last_layer_params"] = _prepare_with_bad_last_layer(model, eplb_tf)
    # what fails on one rank alone is refused on every rank together, none left waiting in the
    # grow's exchange: the map file missing on rank 1, a different (valid) map on rank 1
    reordered = [[e for r in layer for e in reversed(r)] for layer in EXPERT_MAP_SLOTS]
    one_rank = {"map_missing_on_one_rank": EXPERT_MAP if rank == 0 else "/no/such/map.json",
                "map_differs_on_one_rank": EXPERT_MAP if rank == 0 else reordered}
    for key, expert_map in one_rank.items():
        try:
            eplb_tf.prepare(model, expert_map=expert_map)
            out["errors"][key] = None
        except (ValueError, RuntimeError, OSError) as e:
            out["errors"][key] = f"{type(e).__name__}: {e}"
    # a config the updator would refuse is refused before any layer grows
    for key, config in {"attach_nodes": {"num_nodes": 3},
                        "attach_groups": {"num_nodes": 2, "num_groups": 6},
                        "record_path": {"expert_map_record_path": "/dev/null/dir/map.json"}
                        }.items():
        try:
            eplb_native.attach(model, config, hooks=False)
            out["errors"][key] = None
        except ValueError as e:
            out["errors"][key] = str(e)
    out["errors"]["mixed_experts"] = _attach_with_narrow_last_layer(model, eplb_native, eplb_tf)
    out["untouched"] = all(
        lay.experts.num_experts == EXPERTS // NUM_RANKS
        and lay.experts.gate_up_proj.to_local().shape[0] == EXPERTS // NUM_RANKS
        and not hasattr(lay.experts, "eplb_phy2log") for lay in eplb_tf.find_moe_layers(model))
    layers = eplb_tf.prepare(model, expert_map=EXPERT_MAP)
    out["slots"] = layers[0].experts.num_experts
    out["phy2log"] = torch.stack([lay.experts.eplb_phy2log for lay in layers])
    out["mismatched"] = mismatched_slots(layers, ref, rank)
    ids = _inputs(0)
    out["logits"], out["ref_logits"] = model(ids).logits, ref(ids).logits
    try:
        eplb_tf.prepare(model)
        out["errors"]["twice"] = None
    except ValueError as e:
        out["errors"]["twice"] = str(e)
    # an engine driving the cycle itself: the generic attach finds the prepared layers
    updator = eplb_native.attach(model, {"num_redundant_experts": 4},
                                 eplb_tf.find_moe_layers(model)[0].experts.gate_up_proj
                                 .device_mesh.get_group(), hooks=False)
    out["generic_attach"] = (len(updator.layers), updator.phy2log())
    updator.shutdown()
    return out


def run_attach_keywords(path: str, rank: int) -> dict:
    """The integration's attach with keywords and a config that says otherwise: the keywords
    win (the expert_map keyword places the slots and the config's expert_map_path is not
    applied after it; the num_redundant_experts keyword overrides the config's)."""
    import tempfile

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from eplb_native import expert_map
    from eplb_native.integrations import transformers as eplb_tf

    # the config's map: every rank's slots in the opposite order of EXPERT_MAP's (which has 12
    # slots for 8 experts: 4 redundant)
    other = [[e for r in layer for e in reversed(r)] for layer in EXPERT_MAP_SLOTS]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        config_map = os.path.join(tmp, "config_map.json")
        expert_map.save(config_map, other, NUM_RANKS)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32,
            distributed_config=DistributedConfig(tp_size=NUM_RANKS, ep_size=NUM_RANKS,
                                                 tp_plan="auto"))
        updator = eplb_tf.attach(model, {"expert_map_path": config_map, "dynamic_eplb": False,
                                         "num_redundant_experts": 0},
                                 expert_map=EXPERT_MAP, num_redundant_experts=4,
                                 hooks=False)
        out["phy2log"] = updator.phy2log()
        out["buffers"] = torch.stack([lay.experts.eplb_phy2log
                                      for lay in eplb_tf.find_moe_layers(model)])
        updator.shutdown()
    return out


def worker(rank: int, init_method: str, paths: dict, out_dir: str) -> None:
    """One rank: init_method is a fresh ``file://`` rendezvous of this run (no port to race
    for); transformers reads RANK / WORLD_SIZE / LOCAL_RANK from the environment."""
    os.environ.update(RANK=str(rank),
                      WORLD_SIZE=str(NUM_RANKS), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=NUM_RANKS,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for family, path in paths.items():
            scenarios = [(family, run_family)]
            if family == "qwen3_moe":
                scenarios.append(("prepare", run_prepare_checks))
                scenarios.append(("attach_keywords", run_attach_keywords))
            for key, scenario in scenarios:
                try:
                    results[key] = scenario(*((family,) if key == family else ()), path, rank)
                except Exception:  # noqa: BLE001  (reported to the test, which fails it)
                    results[key] = {"error": traceback.format_exc()}
                dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    leave()  # scenarios' failures are in the results the test reads
