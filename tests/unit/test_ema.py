"""EMA of the parameters in host memory (train/ema.py, train.ema_decay): numerics, the copy/update split,
the trainer's integration (skipped steps), checkpoint keys, `ckpt export --ema`, the memory figure.

Tolerance. The EMA is FP32 (ema.lerp_(θ, 1 − d)); the reference is the float64 recurrence
e ← d·e + (1 − d)·θ from the same parameters. Each update rounds once or twice (≤ 2^-23 relative of
|e| and |θ − e|), and older errors shrink by d per step, so after N steps the gap is below
N · 2^-22 · max|θ| (measured on 10^5 elements: 2.2·2^-24·max|θ| after 6 and 100 steps at d = 0.9,
2.6·2^-24 after 6 and 11·2^-24 after 100 steps at d = 0.999). The tests use rtol 0, atol
4·N·2^-24·max|θ|.
"""
import json
import threading
from dataclasses import asdict

import pytest
import torch

from moeforge.train import checkpoint as ckpt
from moeforge.train.ema import ParamEMA, ema_memory


def _tol(n_steps, params):
    return 4 * n_steps * 2.0 ** -24 * max(float(p.detach().abs().max()) for p in params)


def _params():
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.nn.Parameter(torch.randn(7, 5, generator=g))),
            ("b.bias", torch.nn.Parameter(torch.randn(11, generator=g))),
            ("c.weight", torch.nn.Parameter(torch.randn(3, 4, generator=g).to(torch.bfloat16))),
            ("frozen", torch.nn.Parameter(torch.randn(2), requires_grad=False))]


def test_matches_the_float64_recurrence_fp32_and_bf16():
    named, d, steps = _params(), 0.9, 6
    ema = ParamEMA(named, d, torch.device("cpu"))
    assert sorted(ema.ema) == ["a.weight", "b.bias", "c.weight"]  # trainable parameters only
    ref = {n: p.detach().double().clone() for n, p in named if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        ema.wait_copy()
        with torch.no_grad():  # "the optimizer step"
            for _, p in named:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        ema.start()
        for n, p in named:
            if n in ref:
                ref[n] = d * ref[n] + (1 - d) * p.detach().double()
    sd = ema.state_dict()
    assert ema.updates == steps
    tol = _tol(steps, [p for _, p in named])
    for n, r in ref.items():
        assert sd[n].dtype == torch.float32
        torch.testing.assert_close(sd[n].double(), r, rtol=0, atol=tol)


def test_the_update_folds_in_the_parameters_as_they_were_at_start():
    """wait_copy returns once the parameters are copied out: a write right after it (the next optimizer
    step) must not reach the EMA, while the update itself may still be running."""
    named = _params()[:2]
    ema = ParamEMA(named, 0.5, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in named}
    gate, entered = threading.Event(), threading.Event()
    real_lerp = torch.Tensor.lerp_

    def slow_lerp(self, *a, **k):  # the update is slow: it has not run when the parameters change
        entered.set()
        gate.wait(10)
        return real_lerp(self, *a, **k)

    torch.Tensor.lerp_ = slow_lerp
    try:
        ema.start()
        ema.wait_copy()
        assert entered.wait(10)  # the worker is inside the update: wait_copy did not wait for it
        with torch.no_grad():
            for _, p in named:
                p.add_(1000.0)
        gate.set()
        sd = ema.state_dict()
    finally:
        torch.Tensor.lerp_ = real_lerp
        gate.set()
    for n, _ in named:
        torch.testing.assert_close(sd[n], before[n])  # 0.5·θ0 + 0.5·θ0: the +1000 never reached it


def test_a_failed_update_is_raised_on_the_training_thread():
    named = _params()[:1]
    ema = ParamEMA(named, 0.9, torch.device("cpu"))
    ema.staging[0] = torch.empty(3)  # wrong shape: the worker's copy fails
    ema.start()
    with pytest.raises(RuntimeError, match="EMA update failed"):
        ema.wait_copy()
        ema.wait()


def test_decay_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="train.ema_decay"):
        ParamEMA(_params(), 1.0, torch.device("cpu"))


def test_memory_figures():
    assert ema_memory(1000, 2, cuda=True) == {"ema_host_bytes": 4000, "ema_staging_bytes": 2000,
                                             "ema_pinned_bytes": 2000, "ema_total_host_bytes": 6000}
    assert ema_memory(1000, 4, cuda=False)["ema_pinned_bytes"] == 0
    ema = ParamEMA(_params(), 0.9, torch.device("cpu"))
    assert ema.memory()["ema_host_bytes"] == 4 * (35 + 11 + 12)


# --------------------------------------------------------------------------------------------------
# in the trainer


def _cfg(tmp, data, *extra):
    from moeforge.launcher.config import load_job_config

    return load_job_config([f"data.dir={data}", f"run_dir={tmp}", "logging.progress=false", "train.sample_tokens=0",
                            "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=4",
                            "train.eval_batches=1", "train.ema_decay=0.9", *extra])


def test_trainer_ema_follows_its_parameters_and_skips_skipped_steps(tmp_path, stdlib_data, one_thread):
    from moeforge.train.trainer import Trainer

    tr = Trainer(_cfg(tmp_path, stdlib_data, "train.steps=5", "train.debug_nan_step=3"))
    d = tr.ema.decay
    named = [(n, p) for n, p in tr.model.named_parameters() if p.requires_grad]
    assert sorted(tr.ema.ema) == sorted(n for n, _ in named)
    assert {id(p) for _, p in named} == {id(p) for _, p in tr.named_params}  # the parameters the optimizer steps
    ref = {n: p.detach().double().clone() for n, p in named}
    skipped = []
    for _ in range(5):
        r = tr.train_step()
        skipped.append(r["skipped"])
        if not r["skipped"]:
            for n, p in named:
                ref[n] = d * ref[n] + (1 - d) * p.detach().double()
    assert skipped == [False, False, True, False, False]
    sd = tr.ema.state_dict()
    assert tr.ema.updates == 4
    tol = _tol(5, [p for _, p in named])
    for n, r in ref.items():
        torch.testing.assert_close(sd[n].double(), r, rtol=0, atol=tol)
    # the checkpoint holds ema.<fqn> for every parameter, beside model.<fqn>; none without the EMA
    path = tr.save(tmp_path / "ck")
    keys = ckpt.saved_tensors(path)
    assert {k for k in keys if k.startswith("ema.")} == {f"ema.{n}" for n, _ in named}
    assert all(keys[f"ema.{n}"][1] == torch.float32 for n, _ in named)
    assert "ema" in ckpt.read_manifest(path)["contents"]
    saved = ckpt.read_tensors(path, [f"ema.{n}" for n, _ in named])
    assert all(torch.equal(saved[f"ema.{n}"], sd[n]) for n, _ in named)


def test_no_ema_keys_when_decay_is_0(tmp_path, stdlib_data, one_thread):
    from moeforge.train.trainer import Trainer

    tr = Trainer(_cfg(tmp_path, stdlib_data, "train.steps=1", "train.ema_decay=0"))
    assert tr.ema is None
    tr.train_step()
    path = tr.save(tmp_path / "ck")
    assert not [k for k in ckpt.saved_tensors(path) if k.startswith("ema.")]
    assert "ema" not in ckpt.read_manifest(path)["contents"]


# --------------------------------------------------------------------------------------------------
# ckpt export --ema


def _saved_with_ema(root, with_ema=True):
    from moeforge.model.transformer import Transformer
    from test_hf_export import ARGS

    m = Transformer(ARGS)
    m.init_weights(seed=3)
    state = {f"model.{k}": v for k, v in m.state_dict().items()}
    ema = {n: (p.detach().float() * 0.5 + 1.0) for n, p in m.named_parameters()}
    if with_ema:
        state.update({f"ema.{n}": t for n, t in ema.items()})
    state["train.step"] = torch.tensor(7)
    path = ckpt.save(root, 7, state, {"tokens_seen": 123, "config": {"model": asdict(m.args),
                                                                     "train": {"ema_decay": 0.99}},
                                      "layout": {"world_size": 1, "pp": 1, "dp": 1, "ep": 1, "edp": 1}})
    return m, ema, path


def test_export_ema_writes_the_ema_weights(tmp_path):
    from safetensors.torch import load_file

    from moeforge.train.hf_export import export_hf, to_hf_names

    m, ema, path = _saved_with_ema(tmp_path / "ck")
    export_hf(path, tmp_path / "live", log=lambda *a: None)
    export_hf(path, tmp_path / "hf", dtype="float32", log=lambda *a: None, ema=True)
    live, out = load_file(tmp_path / "live/model.safetensors"), load_file(tmp_path / "hf/model.safetensors")
    for k, v in m.state_dict().items():
        (hf,) = to_hf_names(k, m.args.n_layers)
        want = ema[k] if k in ema else v  # the gate biases are buffers: live values
        assert torch.equal(out[hf], want), k
        assert torch.equal(live[hf], v), k
    assert "model.layers.3.embed_tokens.weight" in out  # the MTP layer's copy of the shared embedding: the EMA's
    assert torch.equal(out["model.layers.3.embed_tokens.weight"], ema["embed.weight"])
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert cfg["moeforge_checkpoint"]["weights"] == "ema" and cfg["moeforge_checkpoint"]["ema_decay"] == 0.99


def test_export_ema_without_an_ema_names_the_flag(tmp_path, capsys):
    from moeforge.launcher.cli import main

    _, _, path = _saved_with_ema(tmp_path / "ck", with_ema=False)
    assert main(["ckpt", "export", str(path), "--hf", str(tmp_path / "hf"), "--ema"]) == 2
    err = capsys.readouterr().err
    assert "--ema" in err and "ema_decay=0" in err
    assert main(["ckpt", "export", str(path), "--hf", str(tmp_path / "hf")]) == 0  # without it: the live weights
