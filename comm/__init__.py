"""Expert-parallel communication (TR §3.2.2): moving tokens to the ranks that hold their experts and back.

With `parallel.ep = P`, the routed experts of every MoE layer are split over P ranks (ep rank r holds
the global experts [r·E/P, (r+1)·E/P)), while every rank keeps its own tokens (EP is carved out of data
parallelism). One MoE layer then runs:

    dispatch   each token goes once to every rank that holds one of its top-K experts, with its K gate
               weights and expert ids: count rows per destination, exchange the counts, permute the
               rows by destination, one `all_to_all_single` with uneven splits;
    compute    each rank runs its local experts over the rows it received (grouped by expert) and sums
               the gate-weighted outputs per row;
    combine    the reverse all-to-all brings one summed row per (token, rank) home, where they are added.

Two-hop (`two_hop=True`): a token crosses the inter-node link once per destination node (to the rank
with the sender's local index there) and that relay forwards it inside the node; combine sums at the
relay first, so it also crosses once per node. Node-limited routing (router groups = nodes, keep M)
bounds the nodes, hence the inter-node bytes, per token. FP8 (`fp8=True`): the activations travel as
E4M3 in 1x128 tiles with power-of-2 scales (half the BF16 bytes), the combine in BF16.

    layout.py      pure arithmetic: topology (ranks on nodes, relays, link classes), send plans, node limit
    all_to_all.py  AllToAllDispatcher: autograd-correct dispatch/compute/combine, async Handles
    streams.py     where exchanges run: ThreadCommStream (gloo) and CudaCommStream (NCCL, CUDA events)
    fake_streams.py  fake_cuda_streams(): the torch.cuda stream API on CPU, checking the ordering rules
    counters.py    ByteCounters: bytes sent per link class (inter/intra-node) for the training log

The model never imports this package: `parallel.apply_ep` shards the experts and sets each MoE's
`dispatcher`; `model.moe.LocalDispatcher` is the single-process reference it is tested against.
"""
