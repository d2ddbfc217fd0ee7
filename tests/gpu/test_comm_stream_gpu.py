"""The EP exchange on a real GPU with NCCL at world size 1: CudaCommStream (the collectives on a CUDA stream,
ordered by events, driven from the main thread) against ThreadCommStream on the same NCCL group (at world
size 1 a second thread cannot deadlock, and its collectives order on the default stream), for flat, two-hop
and FP8 dispatch. Two micro-batches overlapped as in DualPipe's F&B pair, then backward: outputs and every
gradient bitwise equal (same kernels, same order of sums), and close to the single-process
LocalDispatcher (only the order of sums differs)."""
import os
import socket
import zlib

import pytest
import torch
import torch.distributed as dist

from moeforge.comm.streams import CudaCommStream, ThreadCommStream
from moeforge.model.args import ModelArgs
from moeforge.model.moe import LocalDispatcher, MoE
from moeforge.parallel.apply_ep import apply_ep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def nccl():
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield dist.group.WORLD


def _moe(two_hop: bool, fp8: bool, stream):
    args = ModelArgs(dim=256, moe_inter_dim=128, n_routed_experts=16, n_activated_experts=4, n_expert_groups=2,
                     n_limited_groups=2, n_shared_experts=1)
    m = MoE(args).cuda()
    with torch.no_grad():
        for name, p in m.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    if stream is not None:
        apply_ep(m, None, 0, 1, ranks_per_node=1, two_hop=two_hop, fp8=fp8, device="cuda")
        m.dispatcher.stream = stream
    return m


def _pair(m, progress):
    xs = [torch.randn(4, 64, 256, generator=torch.Generator().manual_seed(i)).cuda().requires_grad_()
          for i in range(2)]
    if isinstance(m.dispatcher, LocalDispatcher):
        ys = [m(x) for x in xs]
    else:
        disp, routed = m.dispatcher, [m.route_tokens(x) for x in xs]
        hA = disp.dispatch_async(routed[0][0], routed[0][2], routed[0][1])
        progress()
        hB = disp.dispatch_async(routed[1][0], routed[1][2], routed[1][1])
        progress()
        xA, cA = hA.wait()
        hcA = disp.combine_async(disp.compute(xA, cA, m.experts), cA)
        progress()
        xB, cB = hB.wait()
        hcB = disp.combine_async(disp.compute(xB, cB, m.experts), cB)
        progress()
        ys = [m.finish(h.wait(), m.shared(r[0]), r[3], x.shape) for h, r, x in zip((hcA, hcB), routed, xs)]
    sum((y * (i + 1)).sum() for i, y in enumerate(ys)).backward()
    torch.cuda.synchronize()
    return [y.detach() for y in ys] + [x.grad for x in xs] + [p.grad for _, p in sorted(m.named_parameters())
                                                              if p.grad is not None]


@pytest.mark.parametrize("two_hop,fp8", [(False, False), (True, False), (False, True)])
def test_cuda_comm_stream_equals_thread_stream_on_nccl(nccl, two_hop, fp8):
    assert dist.get_backend() == "nccl"
    cuda = CudaCommStream()
    got = _pair(_moe(two_hop, fp8, cuda), cuda.progress)
    thread = ThreadCommStream(timeout_s=120)
    ref = _pair(_moe(two_hop, fp8, thread), thread.progress)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    if not fp8:
        local = _pair(_moe(two_hop, fp8, None), lambda: None)
        for a, b in zip(got, local):
            assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
