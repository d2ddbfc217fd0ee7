"""Hugging Face DeepSeek-V3 layout: export a moeforge checkpoint to config.json + safetensors, import one back.

Our parameter names are DeepSeek's `inference/model.py` names, which its `convert.py` maps from the
Hugging Face checkpoint one path segment at a time; the same map, inverted, gives the HF names:

    embed.weight                               model.embed_tokens.weight
    layers.3.attn_norm.weight                  model.layers.3.input_layernorm.weight
    layers.3.attn.wq_a.weight                  model.layers.3.self_attn.q_a_proj.weight     (also q_a_layernorm,
    layers.3.attn.wkv_a.weight                 model.layers.3.self_attn.kv_a_proj_with_mqa.weight  q_b_proj, q_proj,
    layers.3.ffn.gate.weight / .bias           model.layers.3.mlp.gate.weight / .e_score_correction_bias  kv_*, o_proj)
    layers.3.ffn.experts.5.w1|w2|w3.weight     model.layers.3.mlp.experts.5.gate_proj|down_proj|up_proj.weight
    layers.3.ffn.shared_experts.w1.weight      model.layers.3.mlp.shared_experts.gate_proj.weight
    norm.weight, head.weight                   model.norm.weight, lm_head.weight
    mtp.0.{hnorm,enorm,eh_proj}.weight         model.layers.{L}.{hnorm,enorm,eh_proj}.weight   (L = num_hidden_layers)
    mtp.0.block.<block>                        model.layers.{L}.<block, as above>
    mtp.0.norm.weight                          model.layers.{L}.shared_head.norm.weight
    (shared with the main model)               model.layers.{L}.embed_tokens.weight, model.layers.{L}.shared_head.head.weight

The MTP module is layer L = num_hidden_layers, as in DeepSeek's release (README_WEIGHTS.md); loaders
that do not know MTP ignore it. Rotary dimensions stay in DeepSeek's interleaved order
(`rope_interleave: true`), as in the official weights. config.json carries HF's field names and, under
"moeforge", our ModelArgs, so an import restores fields HF has no name for.

HF's DeepseekV3ForCausalLM hard-codes two things our ModelArgs can vary: it always routes with sigmoid
scores, and it scores a group by its top-2 experts, so it needs at least 2 experts per group (ours takes
min(2, group size)). Export refuses a model that differs there rather than write one that loads and
computes something else (or fails in HF's router). tests/unit/test_hf_export.py loads the export with transformers and compares
its logits with ours.

The files are written and read with the `safetensors` package. Export streams: one output shard of
tensors is read from the DCP checkpoint at a time.

`ema=True` (`moeforge ckpt export --ema`) writes the checkpoint's EMA of the parameters (`ema.<fqn>`,
train.ema_decay > 0: train/ema.py) in place of the live ones; the MoE correction biases, buffers with
no EMA, come from the live model. dtype "auto" is the model's parameter dtype (the EMA is kept in FP32:
`--dtype float32` keeps all of it).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeforge.model.args import ModelArgs
from moeforge.model.transformer import Transformer

from . import checkpoint as ckpt

# one path segment of ours -> Hugging Face (DeepSeek convert.py's mapping, inverted)
SEGMENTS = {
    "attn": "self_attn", "ffn": "mlp", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
    "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj",
}
SEGMENTS_BACK = {v: k for k, v in SEGMENTS.items()}


def _block_to_hf(rest: str) -> str:
    parts = rest.split(".")
    if parts[-2:] == ["gate", "bias"]:
        parts[-1] = "e_score_correction_bias"
    return ".".join(SEGMENTS.get(p, p) for p in parts)


def _block_from_hf(rest: str) -> str:
    parts = rest.split(".")
    if parts[-1] == "e_score_correction_bias":
        parts[-1] = "bias"
    return ".".join(SEGMENTS_BACK.get(p, p) for p in parts)


def to_hf_names(key: str, n_layers: int) -> list[str]:
    """Our model key (without "model.") -> its Hugging Face name(s); the embedding and the head are
    also written under the MTP layers that share them (done by the caller, see shared_mtp_names)."""
    if key == "embed.weight":
        return ["model.embed_tokens.weight"]
    if key == "norm.weight":
        return ["model.norm.weight"]
    if key == "head.weight":
        return ["lm_head.weight"]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m:
        return [f"model.layers.{m.group(1)}.{_block_to_hf(m.group(2))}"]
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", key)
    if m:
        layer, rest = n_layers + int(m.group(1)), m.group(2)
        if rest.startswith("block."):
            return [f"model.layers.{layer}.{_block_to_hf(rest[len('block.'):])}"]
        if rest == "norm.weight":
            return [f"model.layers.{layer}.shared_head.norm.weight"]
        return [f"model.layers.{layer}.{rest}"]  # hnorm, enorm, eh_proj
    raise KeyError(f"no Hugging Face name for model key {key!r}")


def shared_mtp_names(n_layers: int, n_mtp: int) -> dict[str, str]:
    """HF names of the MTP layers' copies of shared tensors -> our key they copy."""
    out = {}
    for k in range(n_mtp):
        out[f"model.layers.{n_layers + k}.embed_tokens.weight"] = "embed.weight"
        out[f"model.layers.{n_layers + k}.shared_head.head.weight"] = "head.weight"
    return out


def from_hf_name(name: str, n_layers: int) -> str | None:
    """Hugging Face name -> our key; None for the MTP layers' copies of the embedding and head."""
    if name == "model.embed_tokens.weight":
        return "embed.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "head.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        raise KeyError(f"unexpected tensor {name!r} in a DeepSeek-V3 checkpoint")
    layer, rest = int(m.group(1)), m.group(2)
    if layer < n_layers:
        return f"layers.{layer}.{_block_from_hf(rest)}"
    k = layer - n_layers
    if rest in ("embed_tokens.weight", "shared_head.head.weight"):
        return None
    if rest == "shared_head.norm.weight":
        return f"mtp.{k}.norm.weight"
    if rest.split(".")[0] in ("hnorm", "enorm", "eh_proj"):
        return f"mtp.{k}.{rest}"
    return f"mtp.{k}.block.{_block_from_hf(rest)}"


# --------------------------------------------------------------------------------------------------
# config.json


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    if args.score_func != "sigmoid":
        raise ValueError(f"model.score_func={args.score_func!r}: DeepseekV3ForCausalLM routes with sigmoid scores only")
    if args.n_expert_groups > 1 and args.n_routed_experts // args.n_expert_groups < 2:
        raise ValueError(f"model.n_expert_groups={args.n_expert_groups} with n_routed_experts={args.n_routed_experts}: "
                         "DeepseekV3ForCausalLM scores a group by its top-2 experts and needs >= 2 per group")
    yarn = args.max_seq_len > args.original_seq_len  # our MLA applies YaRN (and its mscale) only then
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "num_nextn_predict_layers": args.n_mtp_modules,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "n_shared_experts": args.n_shared_experts,
        "n_routed_experts": args.n_routed_experts,
        "routed_scaling_factor": args.route_scale,
        "num_experts_per_tok": args.n_activated_experts,
        "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups,
        "first_k_dense_replace": args.n_dense_layers,
        "moe_layer_freq": 1,
        "scoring_func": args.score_func,
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "aux_loss_alpha": args.seq_aux_loss_alpha,
        "seq_aux": True,
        "q_lora_rank": args.q_lora_rank or None,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": args.rope_factor,
                         "original_max_position_embeddings": args.original_seq_len, "beta_fast": args.beta_fast,
                         "beta_slow": args.beta_slow, "mscale": args.mscale, "mscale_all_dim": args.mscale} if yarn else None,
        "rope_interleave": True,
        "rms_norm_eps": args.norm_eps,
        "initializer_range": args.init_std,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "moeforge": asdict(args),
    }


def args_from_hf_config(cfg: dict, name: str | None = None) -> ModelArgs:
    """ModelArgs from a config.json: ours exactly when it carries "moeforge", else from HF's fields."""
    if "moeforge" in cfg:
        known = {f.name for f in fields(ModelArgs)}
        values = {k: v for k, v in cfg["moeforge"].items() if k in known}
        return ModelArgs(**({**values, "name": name} if name else values))
    if cfg.get("quantization_config"):
        raise ValueError("FP8-quantized Hugging Face checkpoint (quantization_config): dequantize it to BF16 first "
                         "(DeepSeek-V3's inference/fp8_cast_bf16.py), then import")
    rs = cfg.get("rope_scaling") or {}
    d = ModelArgs()
    return ModelArgs(
        name=name or cfg.get("_name_or_path", "hf") or "hf",
        vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], inter_dim=cfg["intermediate_size"],
        n_layers=cfg["num_hidden_layers"], n_dense_layers=cfg.get("first_k_dense_replace", 0),
        n_heads=cfg["num_attention_heads"], max_seq_len=cfg.get("max_position_embeddings", d.max_seq_len),
        q_lora_rank=cfg.get("q_lora_rank") or 0, kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"], moe_inter_dim=cfg["moe_intermediate_size"],
        n_routed_experts=cfg["n_routed_experts"], n_shared_experts=cfg.get("n_shared_experts") or 0,
        n_activated_experts=cfg["num_experts_per_tok"], n_expert_groups=cfg.get("n_group", 1),
        n_limited_groups=cfg.get("topk_group", 1), route_scale=cfg.get("routed_scaling_factor", 1.0),
        score_func=cfg.get("scoring_func", "sigmoid"), seq_aux_loss_alpha=cfg.get("aux_loss_alpha", d.seq_aux_loss_alpha),
        n_mtp_modules=cfg.get("num_nextn_predict_layers", 0), rope_theta=cfg.get("rope_theta", d.rope_theta),
        original_seq_len=rs.get("original_max_position_embeddings", d.original_seq_len),
        rope_factor=rs.get("factor", d.rope_factor), beta_fast=int(rs.get("beta_fast", d.beta_fast)),
        beta_slow=int(rs.get("beta_slow", d.beta_slow)), mscale=rs.get("mscale_all_dim", d.mscale),
        norm_eps=cfg.get("rms_norm_eps", d.norm_eps), init_std=cfg.get("initializer_range", d.init_std),
        dtype="bfloat16" if cfg.get("torch_dtype") == "bfloat16" else "float32",
    )


def hf_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors")
    return files


# --------------------------------------------------------------------------------------------------
# export / import


def resolve_checkpoint(path: str | Path, log=print) -> Path:
    """A step_* folder, or a checkpoints root (its newest whole checkpoint)."""
    path = Path(path)
    if (path / ckpt.MANIFEST).is_file() or ckpt.step_of(path) is not None:
        return path
    found = ckpt.latest_whole(path, log=log)
    if found is None:
        raise FileNotFoundError(f"{path}: no whole checkpoint")
    return found


def export_hf(path: str | Path, out_dir: str | Path, dtype: str = "auto", shard_bytes: int = 5 << 30,
              log=print, ema: bool = False) -> dict:
    """Write config.json + model*.safetensors (+ index when sharded) for the whole checkpoint at path;
    ema: its EMA weights instead of the live ones (ValueError when it holds none)."""
    path, out = resolve_checkpoint(path, log), Path(out_dir)
    why = ckpt.verify(path)
    if why is not None:
        raise ValueError(f"checkpoint {path} is not whole: {why}")
    manifest = ckpt.read_manifest(path)
    known = {f.name for f in fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in ((manifest.get("config") or {}).get("model") or {}).items() if k in known})
    if dtype != "auto":  # the exported weights are the model now
        args = ModelArgs(**{**asdict(args), "dtype": dtype})
    config = hf_config(args, getattr(torch, args.dtype))  # first: it refuses what HF cannot compute
    saved = ckpt.saved_tensors(path)
    index = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
    source = {k: f"model.{k}" for k in index}  # our key -> the checkpoint key its values are read from
    if ema:
        has = {k: f"ema.{k}" for k in index if f"ema.{k}" in saved}
        if not has:
            raise ValueError(f"ckpt export --ema: checkpoint {path} holds no EMA of the parameters (saved with "
                             "train.ema_decay=0, or imported); export its live weights without --ema")
        source.update(has)
    target = None if dtype == "auto" else getattr(torch, dtype)
    plan: list[tuple[str, str]] = []  # (hf name, our key), in a stable order
    for key in sorted(index):
        plan += [(hf, key) for hf in to_hf_names(key, args.n_layers)]
    copies = shared_mtp_names(args.n_layers, args.n_mtp_modules)
    plan += sorted(copies.items())
    plan.sort()

    def out_dtype(hf: str, key: str) -> torch.dtype:
        if hf.endswith("e_score_correction_bias") or target is None:
            return index[key][1]
        return target

    shards, size = [[]], 0
    for hf, key in plan:
        n = math.prod(index[key][0]) * torch.empty((), dtype=out_dtype(hf, key)).element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((hf, key))
        size += n
    out.mkdir(parents=True, exist_ok=True)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        tensors = ckpt.read_tensors(path, sorted({source[k] for _, k in shard}), verify_first=False)
        # save_file refuses tensors that share memory: the MTP layers' embedding/head get their own copy
        part = {hf: tensors[source[key]].to(out_dtype(hf, key), copy=hf in copies) for hf, key in shard}
        save_file(part, out / fname, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update({hf: fname for hf in part})
        del tensors, part
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    config["moeforge_checkpoint"] = {"step": manifest.get("step"), "tokens_seen": manifest.get("tokens_seen"),
                                     "code": manifest.get("code"), "weights": "ema" if ema else "live"}
    if ema:
        config["moeforge_checkpoint"]["ema_decay"] = ((manifest.get("config") or {}).get("train") or {}).get("ema_decay")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    log(f"ckpt export: {path} (step {manifest.get('step')}{', EMA weights' if ema else ''}) -> {out}: "
        f"{len(weight_map)} tensors, "
        f"{total / 2**20:.1f} MiB in {len(names)} file(s)")
    return {"files": names, "tensors": len(weight_map), "bytes": total}


def import_hf(hf_dir: str | Path, out_root: str | Path, step: int = 0, name: str | None = None,
              dtype: str = "auto", log=print) -> Path:
    """Read a Hugging Face DeepSeek-V3 folder into a weights-only moeforge checkpoint out_root/step_N
    (model only: `checkpoint.resume=PATH` starts from it with fresh AdamW moments)."""
    hf_dir = Path(hf_dir)
    if ckpt.list_checkpoints(out_root):
        raise FileExistsError(f"{out_root} already holds checkpoints: import into an empty folder")
    cfg = json.loads((hf_dir / "config.json").read_text())
    args = args_from_hf_config(cfg, name)
    if dtype != "auto":
        args = ModelArgs(**{**asdict(args), "dtype": dtype})
    state, shared = {}, {}
    for f in hf_files(hf_dir):
        for hf, t in load_file(f).items():
            if hf.endswith("_scale_inv"):
                raise ValueError(f"{f}: {hf} is an FP8 scale; dequantize the checkpoint to BF16 first")
            key = from_hf_name(hf, args.n_layers)
            if key is None:
                shared[hf] = t
                continue
            want = torch.float32 if key.endswith("gate.bias") else getattr(torch, args.dtype)
            state[f"model.{key}"] = t.to(want)
    for hf, key in shared_mtp_names(args.n_layers, args.n_mtp_modules).items():
        if hf in shared and not torch.equal(shared[hf].to(state[f"model.{key}"].dtype), state[f"model.{key}"]):
            log(f"ckpt import: {hf} differs from {key}; moeforge shares one tensor and keeps {key}")
    with torch.device("meta"):  # the tensors must be exactly the model's
        expected = {f"model.{k}": tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        raise ValueError(f"{hf_dir} does not match the model its config.json describes: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, wrong shape {wrong[:5]}")
    state["train.step"] = torch.tensor(step, dtype=torch.int64)
    state["train.tokens_seen"] = torch.tensor(0, dtype=torch.int64)
    manifest = {"tokens_seen": 0, "layout": {"world_size": 1, "pp": 1, "dp": 1, "ep": 1, "edp": 1},
                "contents": ["model"], "config": {"model": asdict(args)},
                "imported_from": {"path": str(hf_dir.resolve()), "format": "huggingface/deepseek_v3"},
                "code": ckpt.code_version()}
    path = ckpt.save(out_root, step, state, manifest, keep=1 << 30)
    log(f"ckpt import: {hf_dir} -> {path} ({len(expected)} tensors, model {args.name!r}, weights only)")
    return path
