"""A checkpoint saved under one layout loads under another and continues training.

Saved by 4 gloo ranks at ep=2 (dp=4 = edp 2 x ep 2; interval saves asynchronous), loaded at ep=4,
at dp=4 (ep=1), at ep=2 on 2 ranks and by a single process. In every layout each rank checks that its
model tensors (global layer and expert keys, MoE biases) and its ZeRO-1 optimizer ranges are bitwise
the checkpoint's; the model's outputs on a fixed batch are compared with a single process that loaded
the same checkpoint (bitwise for dp layouts; with EP the expert GEMMs see other row counts, so within
1e-6: measured <= 9e-8, the same gap as an uninterrupted EP run has), and two more steps give the
uninterrupted run's losses (tolerance 1e-6 relative as in test_train_equivalence; measured: bitwise).
Pipeline layouts (the same global keys) are tests/dist/test_pp_train.py's: a pp checkpoint loaded by one
process, a single-process checkpoint resumed at pp=4.
"""
import re

import numpy as np
import pytest
import torch
from _spawn import run_ranks

from moeforge.train.metrics import read_metrics

COMMON = ["train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.sample_tokens=0",
          "logging.progress=false", "train.eval_interval=100", "parallel.timeout_s=60"]
PIECE = re.compile(r"^optim\.(exp_avg|exp_avg_sq)\.(.+)\[(\d+):(\d+)\]$")


def _job(rank, world, overrides):
    from moeforge.launcher.config import load_job_config
    from moeforge.train.loop import run

    run(load_job_config(COMMON + overrides))


def _probe(rank, world, overrides, path):
    """Load `path` under this layout, check the state bitwise, return (logits of a fixed batch, 2 losses)."""
    import torch.distributed as dist

    from moeforge.launcher.config import load_job_config
    from moeforge.train import checkpoint as ckpt
    from moeforge.train.data import SampleStream
    from moeforge.train.build import setup_distributed
    from moeforge.train.trainer import Trainer

    cfg = load_job_config(COMMON + overrides + [f"checkpoint.resume={path}"])
    env, meshes = setup_distributed(cfg)
    try:
        tr = Trainer(cfg, env, meshes)
        assert tr.resume() == 4
        saved = ckpt.load(path)
        for k, v in tr.model.state_dict().items():  # this rank's experts only, under their global ids
            assert torch.equal(v, saved[f"model.{k}"]), k
        full = {}  # the whole flattened moments, assembled from the saving layout's pieces
        for key, t in saved.items():
            m = PIECE.match(key)
            if m:
                kind, name, a, b = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
                full.setdefault((kind, name), {})[(a, b)] = t
        mine = tr.optimizer.state_dict()
        assert mine["step"] == 4 and mine["state"]
        for name, e in mine["state"].items():
            for kind in ("exp_avg", "exp_avg_sq"):
                flat = torch.zeros(int(np.prod(e["shape"])))
                for (a, b), t in full[(kind, name)].items():
                    flat[a:b] = t
                assert torch.equal(e[kind], flat[e["start"]:e["end"]]), (kind, name)
        rows = SampleStream(tr.train_data.dataset, 34).rows(tr.consumed_samples, 8)  # the whole next batch, every rank
        tr.model.eval()
        with torch.no_grad():
            logits, _ = tr.model(rows[:, :32])
        tr.model.train()
        losses = [tr.train_step()["loss"] for _ in range(2)]
        return logits.numpy(), losses
    finally:
        if meshes is not None:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, stdlib_data):
    run_dir = tmp_path_factory.mktemp("ep2")
    run_ranks(_job, 4, [f"data.dir={stdlib_data}", f"run_dir={run_dir}", "parallel.ep=2", "train.steps=6",
                        "checkpoint.interval=2", "checkpoint.keep=3"], timeout_s=400)
    return run_dir


@pytest.fixture(scope="module")
def single(saved, stdlib_data, tmp_path_factory):
    """The reference: one process (a spawned rank, so it has the same 1 intra-op thread) loads step 4."""
    out = run_ranks(_probe, 1, [f"data.dir={stdlib_data}", f"run_dir={tmp_path_factory.mktemp('single')}"],
                    saved / "checkpoints/step_00000004", timeout_s=300)
    return out[0]


@pytest.mark.timeout(600)
def test_saved_layout_and_async_interval_saves(saved):
    from moeforge.train import checkpoint as ckpt

    steps = [ckpt.step_of(p) for p in ckpt.list_checkpoints(saved / "checkpoints")]
    assert steps == [2, 4, 6]
    for p in ckpt.list_checkpoints(saved / "checkpoints"):
        assert ckpt.verify(p) is None
    m = ckpt.read_manifest(saved / "checkpoints/step_00000004")
    assert m["layout"] == {"world_size": 4, "pp": 1, "dp": 4, "ep": 2, "edp": 2}
    assert sorted(m["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]
    keys = ckpt.saved_tensors(saved / "checkpoints/step_00000004")
    assert all(f"model.layers.1.ffn.experts.{e}.w1.weight" in keys for e in range(8))  # global expert ids
    assert "model.layers.1.ffn.gate.bias" in keys and "optim.step" in keys
    assert sorted(k for k in keys if k.startswith("rng.cpu.")) == [f"rng.cpu.rank{r:05d}" for r in range(4)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,world,overrides", [
    ("ep4", 4, ["parallel.ep=4"]),
    ("dp4", 4, []),
    ("ep2_on_2_ranks", 2, ["parallel.ep=2"]),
])
def test_resharded_resume(name, world, overrides, saved, single, stdlib_data, tmp_path):
    outs = run_ranks(_probe, world, [f"data.dir={stdlib_data}", f"run_dir={tmp_path}", *overrides],
                     saved / "checkpoints/step_00000004", timeout_s=400)
    ref_logits, ref_losses = single
    for logits, losses in outs:
        if "ep" in name:  # expert GEMMs see every ep rank's rows: other row counts, rounding-level differences
            np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-6)
        else:
            assert np.array_equal(logits, ref_logits)
        uninterrupted = [r["loss"] for r in read_metrics(saved / "metrics.jsonl")[4:6]]
        assert losses == pytest.approx(uninterrupted, rel=1e-6)
        assert losses == pytest.approx(ref_losses, rel=1e-6)


@pytest.mark.timeout(600)
def test_single_process_loads_the_4_rank_checkpoint(saved, single):
    uninterrupted = [r["loss"] for r in read_metrics(saved / "metrics.jsonl")[4:6]]
    assert single[1] == pytest.approx(uninterrupted, rel=1e-6)
