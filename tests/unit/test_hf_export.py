"""Hugging Face DeepSeek-V3 export/import: names, config.json, logits under transformers, round trip, CLI."""
import json
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file

from moeforge.launcher.ckpt import add_ckpt_parser
from moeforge.model.args import ModelArgs
from moeforge.model.transformer import Transformer
from moeforge.train import checkpoint as ckpt
from moeforge.train.hf_export import args_from_hf_config, export_hf, from_hf_name, import_hf, to_hf_names

ARGS = ModelArgs(name="tiny-test", dim=64, inter_dim=96, n_layers=3, n_dense_layers=1, n_heads=2, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_inter_dim=32,
                 n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2, n_mtp_modules=1)


def _model(args=ARGS):
    m = Transformer(args)
    m.init_weights(seed=3)
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.bias.copy_(torch.randn(args.n_routed_experts) * 1e-3)  # trained balance biases
    return m


def _save(root, m):
    state = {f"model.{k}": v for k, v in m.state_dict().items()}
    state["train.step"] = torch.tensor(7)
    return ckpt.save(root, 7, state, {"tokens_seen": 123, "config": {"model": asdict(m.args)},
                                      "layout": {"world_size": 1, "pp": 1, "dp": 1, "ep": 1, "edp": 1}})


@pytest.fixture
def saved(tmp_path):
    m = _model()
    return m, _save(tmp_path / "ck", m)


def _cli(*argv):
    import argparse

    p = argparse.ArgumentParser()
    add_ckpt_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["ckpt", *map(str, argv)])
    return args.fn(args)


def test_names_follow_hugging_face_deepseek_v3():
    L = ARGS.n_layers
    cases = {
        "embed.weight": "model.embed_tokens.weight",
        "layers.0.attn.wq_a.weight": "model.layers.0.self_attn.q_a_proj.weight",
        "layers.0.attn.q_norm.weight": "model.layers.0.self_attn.q_a_layernorm.weight",
        "layers.0.attn.wkv_a.weight": "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "layers.0.attn.kv_norm.weight": "model.layers.0.self_attn.kv_a_layernorm.weight",
        "layers.0.attn.wkv_b.weight": "model.layers.0.self_attn.kv_b_proj.weight",
        "layers.0.attn.wo.weight": "model.layers.0.self_attn.o_proj.weight",
        "layers.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "layers.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "layers.0.ffn.w1.weight": "model.layers.0.mlp.gate_proj.weight",
        "layers.2.ffn.gate.weight": "model.layers.2.mlp.gate.weight",
        "layers.2.ffn.gate.bias": "model.layers.2.mlp.gate.e_score_correction_bias",
        "layers.2.ffn.experts.5.w1.weight": "model.layers.2.mlp.experts.5.gate_proj.weight",
        "layers.2.ffn.experts.5.w2.weight": "model.layers.2.mlp.experts.5.down_proj.weight",
        "layers.2.ffn.experts.5.w3.weight": "model.layers.2.mlp.experts.5.up_proj.weight",
        "layers.2.ffn.shared_experts.w2.weight": "model.layers.2.mlp.shared_experts.down_proj.weight",
        "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight",
        "mtp.0.eh_proj.weight": f"model.layers.{L}.eh_proj.weight",
        "mtp.0.enorm.weight": f"model.layers.{L}.enorm.weight",
        "mtp.0.norm.weight": f"model.layers.{L}.shared_head.norm.weight",
        "mtp.0.block.attn.wq_b.weight": f"model.layers.{L}.self_attn.q_b_proj.weight",
        "mtp.0.block.ffn.experts.0.w1.weight": f"model.layers.{L}.mlp.experts.0.gate_proj.weight",
    }
    for ours, hf in cases.items():
        assert to_hf_names(ours, L) == [hf]
        assert from_hf_name(hf, L) == ours
    assert from_hf_name(f"model.layers.{L}.embed_tokens.weight", L) is None  # shared with the main model
    names = [n for k in Transformer(ARGS).state_dict() for n in to_hf_names(k, L)]
    assert len(set(names)) == len(names)


# init_std 0.05 (not 0.006) so that every layer moves the logits: at 0.006 the residual stream is
# nearly the embedding, and a wrong YaRN beta or mscale moved the logits by 1e-6 to 4e-6 only.
# "yarn": our MLA applies YaRN only when max_seq_len > original_seq_len; 32 rope dims, so that the
# ramp between beta_fast and beta_slow spans several frequencies (with 8 it moved in whole steps only).
HF_CASES = {
    "q_lora": replace(ARGS, init_std=0.05),
    # norm_eps reaches the blocks' and the head's norms (rms_norm_eps); q/kv latent norms stay at 1e-6 on both sides
    "norm_eps_1e-3": replace(ARGS, init_std=0.05, norm_eps=1e-3),
    "yarn_no_q_lora": replace(ARGS, init_std=0.05, q_lora_rank=0, qk_rope_head_dim=32, max_seq_len=2048,
                              original_seq_len=1024, rope_factor=4.0, mscale=0.707, rope_theta=50000.0,
                              route_scale=1.5),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_transformers_loads_the_export_and_gives_our_logits(case, tmp_path):
    """DeepseekV3ForCausalLM.from_pretrained(export) computes our Transformer's logits.

    Tolerance: atol 1e-5 on float32 logits of std ~0.4. Both sides do the same math in another order
    (HF rotates de-interleaved rope pairs, loops over experts, runs its own attention): they differ
    by at most 8.3e-7 (a few float32 ulps). Each wrong config field tried moved the logits by 9e-3
    (beta_slow 1 -> 2) to 1.1 (n_group 4 -> 1): rope_interleave, rms_norm_eps, routed_scaling_factor,
    n_group/topk_group, norm_topk_prob, rope_theta, rope_scaling factor/mscale_all_dim/beta_fast/
    beta_slow/original_max_position_embeddings, or dropping rope_scaling.
    """
    from transformers import DeepseekV3ForCausalLM

    args = HF_CASES[case]
    model = _model(args).eval()
    export_hf(_save(tmp_path / "ck", model), tmp_path / "hf", log=lambda *a: None)
    hf, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, output_loading_info=True)
    L = args.n_layers
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # HF has no MTP module: layer L is reported as unexpected, as with DeepSeek's own release
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{L}.") for k in info["unexpected_keys"])
    x = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf.eval()(x).logits
    assert ours.std() > 0.3  # the layers matter (see HF_CASES)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("change", [dict(score_func="softmax"), dict(n_expert_groups=8, n_limited_groups=2)])
def test_export_refuses_what_deepseek_v3_for_causal_lm_cannot_compute(change, tmp_path):
    path = _save(tmp_path / "ck", Transformer(replace(ARGS, **change)))
    with pytest.raises(ValueError, match=next(iter(change))):
        export_hf(path, tmp_path / "hf", log=lambda *a: None)
    assert not (tmp_path / "hf").exists()


def test_export_import_round_trip(saved, tmp_path):
    model, path = saved
    info = export_hf(path, tmp_path / "hf", log=lambda *a: None)
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["first_k_dense_replace"],
            cfg["num_nextn_predict_layers"], cfg["q_lora_rank"], cfg["topk_method"]) == (64, 3, 8, 1, 1, 32, "noaux_tc")
    assert cfg["rope_scaling"] is None  # max_seq_len <= original_seq_len: no YaRN in our model either
    assert args_from_hf_config({k: v for k, v in cfg.items() if k != "moeforge"}, name="tiny-test") == ARGS
    tensors = load_file(tmp_path / "hf/model.safetensors")
    assert info["files"] == ["model.safetensors"] and len(tensors) == info["tensors"]
    assert torch.equal(tensors["model.layers.3.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(tensors["model.layers.3.shared_head.head.weight"], tensors["lm_head.weight"])
    assert torch.equal(tensors["model.layers.2.mlp.gate.e_score_correction_bias"], model.layers["2"].ffn.gate.bias)

    back = import_hf(tmp_path / "hf", tmp_path / "imported", log=lambda *a: None)
    assert ckpt.verify(back) is None and ckpt.read_manifest(back)["contents"] == ["model"]
    a, b = ckpt.load(path), ckpt.load(back)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model.")) and \
        sorted(k for k in a if k.startswith("model.")) == sorted(k for k in b if k.startswith("model."))
    m2 = Transformer(ARGS)
    m2.load_state_dict({k[len("model."):]: v for k, v in b.items() if k.startswith("model.")})
    x = torch.randint(0, ARGS.vocab_size, (2, 16))
    assert torch.equal(model(x, [x])[0], m2(x, [x])[0])


def test_sharded_bf16_export(saved, tmp_path):
    _, path = saved
    info = export_hf(path, tmp_path / "hf", dtype="bfloat16", shard_bytes=200_000, log=lambda *a: None)
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    assert len(info["files"]) > 1 and sorted(set(index["weight_map"].values())) == info["files"]
    assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == "bfloat16"
    t = load_file(tmp_path / "hf" / index["weight_map"]["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    back = import_hf(tmp_path / "hf", tmp_path / "imported", log=lambda *a: None)
    a, b = ckpt.load(path), ckpt.load(back)
    assert b["model.layers.0.attn.wq_a.weight"].dtype == torch.bfloat16  # the imported model is bf16 now
    assert torch.equal(b["model.layers.0.attn.wq_a.weight"], a["model.layers.0.attn.wq_a.weight"].bfloat16())


def test_cli_inspect_export_import(saved, tmp_path, capsys):
    _, path = saved
    assert _cli("inspect", path.parent) == 0
    out = capsys.readouterr().out
    assert "step 7, whole" in out and "layout      world=1 pp=1 dp=1 ep=1 edp=1" in out and "tokens seen 123" in out
    (path / "__0_0.distcp").write_bytes(b"\0")  # damage it
    assert _cli("inspect", path) == 2
    assert "NOT WHOLE" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not whole"):
        _cli("export", path, "--hf", tmp_path / "hf")


def test_import_refuses_a_folder_that_does_not_match_its_config(saved, tmp_path):
    _, path = saved
    export_hf(path, tmp_path / "hf", log=lambda *a: None)
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    cfg["moeforge"]["n_routed_experts"] = 4
    cfg["moeforge"]["n_expert_groups"] = 2
    (tmp_path / "hf/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        import_hf(tmp_path / "hf", tmp_path / "imported", log=lambda *a: None)
