"""`moeforge plan`'s EP byte counts equal what a real run records, rank by rank.

Four gloo ranks act as 2 nodes x 2 (ep = 4): the tiny model, expert-parallel through parallel.apply_ep,
runs one forward + backward on 8 sequences of 32 tokens per rank (its 4 MoE layers: 3 blocks + the MTP
block), for flat and two-hop dispatch, BF16-sized (here FP32) and FP8 payloads. Each rank returns its
comm.counters.ByteCounters and the expert ids its router picked in every MoE layer; the test feeds those
ids to launcher.plan.ep_bytes_for_routing and wants every (event, link, part) byte count exactly.
"""
import torch
import torch.nn.functional as F
from _spawn import run_ranks

from moeforge.comm.counters import ByteCounters
from moeforge.comm.layout import EPTopology
from moeforge.launcher.plan import ep_bytes_for_routing
from moeforge.model.args import load_preset
from moeforge.model.moe import MoE
from moeforge.model.transformer import Transformer
from moeforge.parallel.apply_ep import apply_ep

WORLD, RPN, BATCH, SEQ = 4, 2, 8, 32
MODES = [(False, False), (True, False), (False, True), (True, True)]  # (two_hop, fp8)


def _run(rank, world):
    args = load_preset("tiny")
    out = {}
    for two_hop, fp8 in MODES:
        with torch.device("meta"):
            model = Transformer(args)
        counters = ByteCounters()
        apply_ep(model, None, rank, world, ranks_per_node=RPN, two_hop=two_hop, fp8=fp8, counters=counters)
        model.to_empty(device="cpu")
        model.init_weights(0)
        ids = {}
        for name, m in model.named_modules():
            if isinstance(m, MoE):
                m.gate.register_forward_hook(lambda mod, inp, o, name=name: ids.__setitem__(name, o[1].clone()))
        g = torch.Generator().manual_seed(100 + rank)
        toks = torch.randint(0, args.vocab_size, (BATCH, SEQ + 2), generator=g)
        logits, mtp = model(toks[:, :SEQ], [toks[:, 1:SEQ + 1]])
        loss = F.cross_entropy(logits.flatten(0, 1), toks[:, 1:SEQ + 1].flatten()) + 0.3 * F.cross_entropy(
            mtp[0].flatten(0, 1), toks[:, 2:SEQ + 2].flatten())
        loss.backward()
        # plain lists: tensors would travel through shared memory that dies with the rank
        out[(two_hop, fp8)] = {"ids": {k: v.tolist() for k, v in ids.items()},
                               "bytes": {k: v for k, v in counters.bytes.items() if v}}
    return out


def test_plan_bytes_equal_the_counters_of_a_real_run():
    results = run_ranks(_run, WORLD, timeout_s=120, pg_timeout_s=60)
    args = load_preset("tiny")
    topo = EPTopology.from_ranks(list(range(WORLD)), args.n_routed_experts, RPN)
    x_bytes = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    layers = sorted(results[0][MODES[0]]["ids"])
    assert len(layers) == args.n_moe_layers + args.n_mtp_modules, layers
    for mode in MODES:
        expected = [{} for _ in range(WORLD)]
        for layer in layers:
            ids = [torch.tensor(results[r][mode]["ids"][layer]) for r in range(WORLD)]
            assert all(i.shape == (BATCH * SEQ, args.n_activated_experts) for i in ids)
            for r, d in enumerate(ep_bytes_for_routing(ids, topo, args.dim, x_bytes, fp8=mode[1], two_hop=mode[0])):
                for k, v in d.items():
                    expected[r][k] = expected[r].get(k, 0) + v
        for r in range(WORLD):
            measured = results[r][mode]["bytes"]
            assert measured == expected[r], (mode, r, measured, expected[r])
            assert any(k[1] == "inter" for k in measured) and any(k[1] == "intra" for k in measured), (mode, r)
