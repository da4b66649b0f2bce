"""Hugging Face formats of the model: config and weight maps, and reading / writing HF directories.

Two formats (../DESIGN.md section 7):

  fla         flash-linear-attention's GatedDeltaNetForCausalLM (model_type "gated_deltanet"). Its parameter
              names are ours, so the weights map one to one (lm_head.weight is left out when tied).
  qwen3_next  stock transformers' Qwen3NextForCausalLM with every layer "linear_attention" and a dense
              SwiGLU MLP in every layer. Its GDN layer computes our function with fused tensors:

    ours (layer i, prefix model.layers.i.)           qwen3_next (prefix model.layers.i.)
    attn_norm.weight w                               input_layernorm.weight w - 1     (its RMSNorm scales by 1 + w)
    mlp_norm.weight w                                post_attention_layernorm.weight w - 1
    attn.{q,k,v,g}_proj.weight                       linear_attn.in_proj_qkvz.weight  grouped per key head h:
                                                       [q_h | k_h | v of h's value heads | g (z) of h's value heads]
    attn.{b,a}_proj.weight                           linear_attn.in_proj_ba.weight    per key head h: [b_h.. | a_h..]
    attn.{q,k,v}_conv1d.weight  [D, 1, W]            linear_attn.conv1d.weight [2 Dk + Dv, 1, W] = cat(q, k, v)
    attn.A_log, attn.dt_bias                         linear_attn.A_log, linear_attn.dt_bias
    attn.o_norm.weight                               linear_attn.norm.weight          (the gated norm: w itself)
    attn.o_proj.weight                               linear_attn.out_proj.weight
    mlp.{gate,up,down}_proj.weight                   mlp.{gate,up,down}_proj.weight
    model.embeddings.weight, model.norm.weight w     model.embed_tokens.weight, model.norm.weight w - 1

  Value head j reads q/k head j // (HV / H) in both models (transformers repeat_interleaves q and k),
  so "h's value heads" are the consecutive heads h r .. h r + r - 1 with r = HV / H.
  Without short convolutions our layer computes silu(Wq x): an identity kernel (1 at the last tap)
  expresses it exactly. Not expressible (refused): use_gate=False (transformers always gates the norm),
  allow_neg_eigval (beta = sigmoid(b), never 2 sigmoid(b)), conv_bias (its conv1d has bias=False).

Reading HF directories never executes anything from them: config.json is parsed as JSON, weights are
read from safetensors; pickle-based files (pytorch_model.bin) are refused unless allow_pickle=True, and
even then read with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from .configuration import GatedDeltaNetConfig

FLA = "fla"
QWEN3_NEXT = "qwen3_next"
FORMATS = (FLA, QWEN3_NEXT)
MODEL_TYPES = {FLA: "gated_deltanet", QWEN3_NEXT: "qwen3_next"}
ARCHITECTURES = {FLA: "GatedDeltaNetForCausalLM", QWEN3_NEXT: "Qwen3NextForCausalLM"}

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_WEIGHTS_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ConversionError(ValueError):
    """A model, directory or option that cannot be converted; the message says what and what to do."""


# ----------------------------------------------------------------------------------------------------
# Configs

def check_expressible(config: GatedDeltaNetConfig, fmt: str) -> None:
    """Raise ConversionError when `config` cannot be written in format `fmt` without changing the function."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if config.conv_bias:
        raise ConversionError(f"the {fmt} format has no short-convolution bias (conv_bias=True in this model)")
    if fmt == QWEN3_NEXT:
        if not config.use_gate:
            raise ConversionError("qwen3_next cannot express use_gate=False: its GDN layer always multiplies the "
                                  "normed output by silu(z); export with --format fla instead")
        if config.allow_neg_eigval:
            raise ConversionError("qwen3_next cannot express allow_neg_eigval=True: its beta is sigmoid(b) in "
                                  "(0, 1), not 2 sigmoid(b); export with --format fla instead")


def to_hf_config(config: GatedDeltaNetConfig, fmt: str, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of `config` in format `fmt` (the vocabulary size is taken as it is)."""
    check_expressible(config, fmt)
    dtype_name = _DTYPE_NAMES[dtype]
    common = {
        "architectures": [ARCHITECTURES[fmt]], "model_type": MODEL_TYPES[fmt],
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "max_position_embeddings": config.max_position_embeddings, "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        # transformers >= 5 reads "dtype"; older versions (and fla's loaders on them) read "torch_dtype".
        "dtype": dtype_name, "torch_dtype": dtype_name,
    }
    if fmt == FLA:
        # flash-linear-attention's GatedDeltaNetConfig fields (paper.md section 5.1); the fuse_* switches only
        # choose its kernels, and attn=None means no softmax-attention layers.
        return {**common, "use_cache": True, "attn_mode": config.attn_mode, "expand_v": config.expand_v,
                "head_dim": config.head_dim, "num_heads": config.num_heads, "num_v_heads": config.num_v_heads,
                "use_gate": config.use_gate, "use_short_conv": config.use_short_conv,
                "allow_neg_eigval": config.allow_neg_eigval, "conv_size": config.conv_size,
                "hidden_ratio": config.hidden_ratio, "hidden_act": "swish", "norm_eps": config.norm_eps,
                "attn": None, "fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True,
                "fuse_linear_cross_entropy": False, "use_l2warp": False}
    layers = list(range(config.num_hidden_layers))
    return {
        **common, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
        # transformers (checked up to 5.24) cannot build a cache for a Qwen3-Next with no full-attention layer:
        # DynamicCache.get_seq_length raises ("can only be called on Attention layers"). Without a cache every
        # forward and generate() works (generation re-reads the prefix each step, fine for these models).
        "use_cache": False,
        "layer_types": ["linear_attention"] * config.num_hidden_layers,
        "linear_num_key_heads": config.num_heads, "linear_num_value_heads": config.num_v_heads,
        "linear_key_head_dim": config.head_dim, "linear_value_head_dim": config.head_v_dim,
        "linear_conv_kernel_dim": config.conv_size,
        # Dense MLPs everywhere: every layer is an "mlp only" layer and there are no experts.
        "mlp_only_layers": layers, "decoder_sparse_step": 1, "num_experts": 0, "num_experts_per_tok": 0,
        "moe_intermediate_size": config.intermediate_size, "shared_expert_intermediate_size": 0,
        "norm_topk_prob": True, "output_router_logits": False, "router_aux_loss_coef": 0.0,
        # The softmax-attention fields are required by the config class but unused (no full_attention layer).
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_heads,
        "head_dim": config.head_dim, "attention_bias": False, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    }


def _require(values: Mapping, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in values]
    if missing:
        raise ConversionError(f"{what} lacks {', '.join(missing)}")


def from_hf_config(values: Mapping) -> tuple[GatedDeltaNetConfig, str]:
    """(our config, format) of a config.json dict in the fla or qwen3_next format; refuses what we cannot run."""
    model_type = values.get("model_type")
    if model_type == MODEL_TYPES[FLA]:
        _require(values, ("hidden_size", "num_hidden_layers", "vocab_size"), "config.json (gated_deltanet)")
        if values.get("attn"):
            raise ConversionError("this fla model has softmax-attention layers (config 'attn'); megatron_gdn "
                                  "models are pure Gated DeltaNet")
        if values.get("hidden_act", "swish") not in ("swish", "silu"):
            raise ConversionError(f"hidden_act {values['hidden_act']!r} is not supported (only swish / SwiGLU)")
        known = {k: values[k] for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "num_v_heads", "head_dim", "expand_v",
            "use_gate", "use_short_conv", "allow_neg_eigval", "conv_size", "attn_mode", "hidden_ratio",
            "intermediate_size", "norm_eps", "max_position_embeddings", "initializer_range", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id") if k in values}
        return GatedDeltaNetConfig(**known), FLA
    if model_type == MODEL_TYPES[QWEN3_NEXT]:
        _require(values, ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                          "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                          "linear_value_head_dim"), "config.json (qwen3_next)")
        layers = values["num_hidden_layers"]
        layer_types = values.get("layer_types")
        if layer_types is None or any(t != "linear_attention" for t in layer_types):
            raise ConversionError("this qwen3_next model has full-attention layers (layer_types); megatron_gdn "
                                  "models are pure Gated DeltaNet (every layer linear_attention)")
        dense = set(values.get("mlp_only_layers") or [])
        sparse_step = values.get("decoder_sparse_step", 1)
        moe = [i for i in range(layers) if i not in dense and values.get("num_experts", 0) > 0
               and (i + 1) % sparse_step == 0]
        if moe:
            raise ConversionError(f"this qwen3_next model has mixture-of-experts MLPs in layers {moe[:8]}; "
                                  f"megatron_gdn models have dense SwiGLU MLPs")
        if values.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConversionError(f"hidden_act {values['hidden_act']!r} is not supported (only silu / SwiGLU)")
        head_dim, head_v_dim = values["linear_key_head_dim"], values["linear_value_head_dim"]
        config = GatedDeltaNetConfig(
            vocab_size=values["vocab_size"], hidden_size=values["hidden_size"], num_hidden_layers=layers,
            num_heads=values["linear_num_key_heads"], num_v_heads=values["linear_num_value_heads"],
            head_dim=head_dim, expand_v=head_v_dim / head_dim if head_v_dim % head_dim else head_v_dim // head_dim,
            conv_size=values.get("linear_conv_kernel_dim", 4), intermediate_size=values["intermediate_size"],
            norm_eps=values.get("rms_norm_eps", 1e-6),
            max_position_embeddings=values.get("max_position_embeddings", 2048),
            initializer_range=values.get("initializer_range", 0.02),
            tie_word_embeddings=values.get("tie_word_embeddings", False),
            bos_token_id=values.get("bos_token_id"), eos_token_id=_single_id(values.get("eos_token_id")),
            pad_token_id=values.get("pad_token_id"))
        if config.head_v_dim != head_v_dim:
            raise ConversionError(f"linear_value_head_dim {head_v_dim} is not expressible as head_dim x expand_v")
        return config, QWEN3_NEXT
    raise ConversionError(f"model_type {model_type!r} is not supported: expected 'gated_deltanet' "
                          f"(flash-linear-attention) or 'qwen3_next'")


def _single_id(value):
    """transformers allows a list of eos ids; our config holds one (the first)."""
    return value[0] if isinstance(value, list) and value else value


# ----------------------------------------------------------------------------------------------------
# Weights

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Zero-centred RMSNorms in qwen3_next (ours -> theirs); they store w - 1 and scale by (1 + w).
_QWEN_NORMS = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight"}
_QWEN_MIXER = {"A_log": "A_log", "dt_bias": "dt_bias", "o_norm.weight": "norm.weight",
               "o_proj.weight": "out_proj.weight"}


def _drop_tied_head(config: GatedDeltaNetConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}


def identity_conv_weight(channels: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A depthwise kernel [channels, 1, width] whose output is its input (1 at the last tap: x[t])."""
    weight = torch.zeros(channels, 1, width, dtype=dtype)
    weight[:, 0, -1] = 1.0
    return weight


def to_hf_state_dict(config: GatedDeltaNetConfig, state: Mapping[str, torch.Tensor],
                     fmt: str) -> dict[str, torch.Tensor]:
    """Our full (unsharded) state dict -> the HF format's tensors, in fp32 (cast afterwards)."""
    check_expressible(config, fmt)
    state = {k: v.detach().float() for k, v in _drop_tied_head(config, state).items()}
    if fmt == FLA:
        return state
    H, HV, K, V = config.num_heads, config.num_v_heads, config.head_dim, config.head_v_dim
    r = HV // H  # value heads per key head
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "model.embeddings.weight":
            out["model.embed_tokens.weight"] = tensor
        elif name == "model.norm.weight":
            out[name] = tensor - 1.0
        elif name == "lm_head.weight":
            out[name] = tensor
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        for ours, theirs in _QWEN_NORMS.items():
            out[dst + theirs] = state[src + ours] - 1.0
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[dst + f"mlp.{proj}.weight"] = state[src + f"mlp.{proj}.weight"]
        attn = src + "attn."
        hidden = config.hidden_size
        q = state[attn + "q_proj.weight"].view(H, K, hidden)
        k = state[attn + "k_proj.weight"].view(H, K, hidden)
        v = state[attn + "v_proj.weight"].view(H, r * V, hidden)
        z = state[attn + "g_proj.weight"].view(H, r * V, hidden)
        out[dst + "linear_attn.in_proj_qkvz.weight"] = torch.cat([q, k, v, z], dim=1).reshape(-1, hidden)
        b = state[attn + "b_proj.weight"].view(H, r, hidden)
        a = state[attn + "a_proj.weight"].view(H, r, hidden)
        out[dst + "linear_attn.in_proj_ba.weight"] = torch.cat([b, a], dim=1).reshape(-1, hidden)
        if config.use_short_conv:
            conv = torch.cat([state[attn + f"{c}_conv1d.weight"] for c in "qkv"], dim=0)
        else:
            conv = identity_conv_weight(2 * H * K + HV * V, config.conv_size)
        out[dst + "linear_attn.conv1d.weight"] = conv
        for ours, theirs in _QWEN_MIXER.items():
            out[dst + "linear_attn." + theirs] = state[attn + ours]
    return out


def from_hf_state_dict(config: GatedDeltaNetConfig, state: Mapping[str, torch.Tensor],
                       fmt: str) -> dict[str, torch.Tensor]:
    """The HF format's tensors -> our full state dict in fp32 (lm_head.weight filled in when tied)."""
    state = {k: v.float() for k, v in state.items()}
    if fmt == FLA:
        # Older fla checkpoints carry an unused attn.D; it is not part of the function.
        out = {k: v for k, v in state.items() if not k.endswith(".attn.D")}
    elif fmt == QWEN3_NEXT:
        out = _from_qwen3_next(config, state)
    else:
        raise ConversionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embeddings.weight"]
    return out


def _from_qwen3_next(config: GatedDeltaNetConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    H, HV, K, V = config.num_heads, config.num_v_heads, config.head_dim, config.head_v_dim
    r = HV // H
    hidden = config.hidden_size
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ConversionError(f"the qwen3_next weights lack {name}")
        used.add(name)
        return state[name]

    out["model.embeddings.weight"] = take("model.embed_tokens.weight")
    out["model.norm.weight"] = take("model.norm.weight") + 1.0
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        for ours, theirs in _QWEN_NORMS.items():
            out[dst + ours] = take(src + theirs) + 1.0
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[dst + f"mlp.{proj}.weight"] = take(src + f"mlp.{proj}.weight")
        lin = src + "linear_attn."
        qkvz = take(lin + "in_proj_qkvz.weight").view(H, 2 * K + 2 * r * V, hidden)
        q, k, v, z = torch.split(qkvz, [K, K, r * V, r * V], dim=1)
        ba = take(lin + "in_proj_ba.weight").view(H, 2 * r, hidden)
        b, a = torch.split(ba, [r, r], dim=1)
        attn = dst + "attn."
        for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("g_proj", z), ("b_proj", b), ("a_proj", a)):
            out[attn + name + ".weight"] = part.reshape(-1, hidden).contiguous()
        conv = take(lin + "conv1d.weight")
        if conv.dim() == 2:  # some exports squeeze the depthwise dimension
            conv = conv[:, None, :]
        q_conv, k_conv, v_conv = torch.split(conv, [H * K, H * K, HV * V], dim=0)
        for name, part in (("q_conv1d", q_conv), ("k_conv1d", k_conv), ("v_conv1d", v_conv)):
            out[attn + name + ".weight"] = part.contiguous()
        if lin + "conv1d.bias" in state:
            raise ConversionError(f"{lin}conv1d.bias: a short-convolution bias is not supported")
        for ours, theirs in _QWEN_MIXER.items():
            out[attn + ours] = take(lin + theirs)
    # The multi-token-prediction head (mtp.*) is ignored by transformers too; anything else is unexpected.
    extra = sorted(k for k in state if k not in used and not k.startswith("mtp.")
                   and not (config.tie_word_embeddings and k == "lm_head.weight"))
    if extra:
        raise ConversionError(f"unexpected qwen3_next weights (not a pure-GDN dense model?): {', '.join(extra[:6])}")
    return out


def resize_vocabulary(state: Mapping[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Cut the embedding / lm head rows to vocab_size, or pad them with zero rows up to it.

    Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP; the padding rows are
    never a target and are removed on export (and zero rows are added back on import)."""
    out = dict(state)
    for name in ("model.embeddings.weight", "lm_head.weight"):
        if name not in out:
            continue
        weight = out[name]
        if weight.shape[0] >= vocab_size:
            out[name] = weight[:vocab_size].contiguous()
        else:
            out[name] = torch.cat([weight, weight.new_zeros(vocab_size - weight.shape[0], weight.shape[1])])
    return out


# ----------------------------------------------------------------------------------------------------
# HF directories: safetensors (sharded above a size), config.json

def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '10KiB' or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"cannot read the size {text!r}: write e.g. 5GB, 500MB or a number of bytes")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def save_safetensors(state: Mapping[str, torch.Tensor], directory: str | os.PathLike,
                     max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Write state as model.safetensors, or as model-0000i-of-0000N.safetensors plus the index json when it is
    larger than max_shard_size (transformers' layout). Returns the file names written."""
    directory = Path(directory)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name in sorted(state):
        tensor = state[name].detach().contiguous().clone()  # no shared storage (tied weights) in safetensors
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += nbytes
    if len(shards) == 1:
        _save_shard(shards[0], directory / SAFE_WEIGHTS)
        return [SAFE_WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        _save_shard(shard, directory / file_name)
        weight_map.update({k: file_name for k in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / SAFE_WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names + [SAFE_WEIGHTS_INDEX]


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})  # transformers checks the "pt" format tag
    # safetensors creates the file owner-only (0600); give it the permissions of the other files written here.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_hf_weights(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, from model.safetensors or its sharded index.

    Pickle-based weights (pytorch_model.bin) are refused unless allow_pickle: unpickling a stranger's file
    can run code. Even then they are read with weights_only=True."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / SAFE_WEIGHTS_INDEX).exists():
        files = _index_files(directory, SAFE_WEIGHTS_INDEX)
    elif (directory / SAFE_WEIGHTS).exists():
        files = [SAFE_WEIGHTS]
    elif (directory / PICKLE_WEIGHTS_INDEX).exists() or (directory / PICKLE_WEIGHTS).exists():
        if not allow_pickle:
            raise ConversionError(
                f"{directory} holds only pickle-based weights ({PICKLE_WEIGHTS}); loading a pickle from an "
                f"untrusted source can execute code. Convert it to safetensors, or pass --allow-pickle if you "
                f"trust its origin")
        files = (_index_files(directory, PICKLE_WEIGHTS_INDEX) if (directory / PICKLE_WEIGHTS_INDEX).exists()
                 else [PICKLE_WEIGHTS])
    else:
        raise ConversionError(f"{directory} has no weights ({SAFE_WEIGHTS}, {SAFE_WEIGHTS_INDEX} or {PICKLE_WEIGHTS})")
    state: dict[str, torch.Tensor] = {}
    for file_name in files:
        path = directory / file_name
        try:
            if file_name.endswith(".safetensors"):
                part = load_file(str(path))
            else:
                part = torch.load(path, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, EOFError) as e:
            raise ConversionError(f"{path} is not a readable weight file: {str(e).splitlines()[0]}") from None
        state.update(part)
    return state


def _index_files(directory: Path, index_name: str) -> list[str]:
    """The shard files an index names, each checked to exist (a missing shard is an error, not a silent gap)."""
    try:
        weight_map = json.loads((directory / index_name).read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{directory / index_name} is not a valid weight index ({e})") from None
    files = sorted(set(weight_map.values()))
    for name in files:
        if "/" in name or "\\" in name or name.startswith("."):
            raise ConversionError(f"{directory / index_name} names a shard outside the directory: {name!r}")
        if not (directory / name).exists():
            raise ConversionError(f"shard {name} listed in {index_name} is missing from {directory}")
    return files


def read_hf_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        values = json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return values


def load_hf_model_state(directory: str | os.PathLike, allow_pickle: bool = False
                        ) -> tuple[GatedDeltaNetConfig, dict[str, torch.Tensor], str]:
    """(our config, our full fp32 state dict, format) of an fla or qwen3_next HF directory."""
    config, fmt = from_hf_config(read_hf_config(directory))
    state = from_hf_state_dict(config, load_hf_weights(directory, allow_pickle), fmt)
    return config, state, fmt


def write_hf_model(directory: str | os.PathLike, config: GatedDeltaNetConfig, state: Mapping[str, torch.Tensor],
                   fmt: str = FLA, dtype: torch.dtype = torch.float32,
                   max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write config.json, generation_config.json and the safetensors of a full model into `directory`.

    The vocabulary is written as config.vocab_size says (resize the state first to remove padding)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(config, state, fmt)
    # A_log and dt_bias stay fp32 in every format: they set the decay exp(-exp(A_log) softplus(.)), whose
    # precision matters most, and both loaders cast them on use.
    tensors = {k: v if k.endswith(("A_log", "dt_bias")) else v.to(dtype) for k, v in tensors.items()}
    save_safetensors(tensors, directory, max_shard_size)
    _write_json(directory / "config.json", to_hf_config(config, fmt, dtype))
    _write_json(directory / "generation_config.json", generation_config(config, fmt))


def generation_config(config: GatedDeltaNetConfig, fmt: str) -> dict:
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else eos
    return {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False,
            "use_cache": fmt != QWEN3_NEXT}  # see to_hf_config: no cache for an all-linear Qwen3-Next


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------
# Tokenizer files for a SentencePiece model

# Texts on which the Hugging Face tokenizer must give SentencePiece's ids: spaces at the start and in runs,
# newlines, tabs, digits, non-ASCII characters and byte fallback. (Special-token strings such as "</s>" typed
# into a text are one known difference: transformers turns them into the special token, SentencePiece does not.)
TOKENIZER_PROBES = (
    "Hello world", " leading space", "  two spaces and trailing ", "def f(x):\n    return x * 2  # doubled\n\n\tTab",
    "x = 1\n\n\n    y = 2\n", "1234567890 3.14159", "Größe, naïve café, 東京, emoji 🚀", "",
)


def write_tokenizer_files(directory: str | os.PathLike, model_path: str | os.PathLike) -> list[str]:
    """Write the SentencePiece model and the files transformers needs to load it into `directory`.

    BPE models load as LlamaTokenizer (transformers converts tokenizer.model itself); unigram models get a
    tokenizer.json of their own (the Llama conversion assumes BPE) and load as PreTrainedTokenizerFast.
    When transformers is installed the tokenizer is loaded back, checked to give SentencePiece's ids on
    TOKENIZER_PROBES, and saved as tokenizer.json too, so that loading needs neither sentencepiece nor
    protobuf. Returns the file names written."""
    import sentencepiece as spm

    directory = Path(directory)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except (RuntimeError, OSError) as e:
        raise ConversionError(f"{model_path} is not a SentencePiece model ({str(e).splitlines()[0]})") from None
    proto = _sentencepiece_proto(sp)
    unigram = proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM
    add_prefix_space = bool(proto.normalizer_spec.add_dummy_prefix)
    shutil.copyfile(model_path, directory / "tokenizer.model")
    specials = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    special_tokens = {name: sp.id_to_piece(i) for name, i in specials.items() if i >= 0}
    written = ["tokenizer.model"]
    if unigram:
        _unigram_tokenizer_json(proto, sp, add_prefix_space).save(str(directory / "tokenizer.json"))
        written.append("tokenizer.json")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast" if unigram else "LlamaTokenizer",
        **special_tokens,
        # Training data is documents followed by </s> (no <s>), so prompts are encoded without specials.
        "add_bos_token": False, "add_eos_token": False,
        "legacy": False, "add_prefix_space": add_prefix_space, "clean_up_tokenization_spaces": False,
        # A recurrent model has no context limit: no length warning from the tokenizer.
        "model_max_length": 1_000_000_000_000,
    }
    _write_json(directory / "tokenizer_config.json", tokenizer_config)
    _write_json(directory / "special_tokens_map.json", special_tokens)
    written += ["tokenizer_config.json", "special_tokens_map.json"]
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return written  # transformers converts tokenizer.model when it loads the directory
    hf = AutoTokenizer.from_pretrained(str(directory))  # a local directory: no download, no remote code
    for text in TOKENIZER_PROBES:
        ours, theirs = sp.encode(text), hf(text, add_special_tokens=False)["input_ids"]
        if ours != theirs or hf.decode(theirs) != text:
            raise ConversionError(f"the Hugging Face tokenizer built from {model_path} encodes {text!r} as "
                                  f"{theirs[:12]} but SentencePiece gives {ours[:12]}; export without the "
                                  f"tokenizer (--no-tokenizer) and ship tokenizer.model separately")
    if not unigram:
        hf.backend_tokenizer.save(str(directory / "tokenizer.json"))
        written.append("tokenizer.json")
    return written


def _sentencepiece_proto(sp):
    """The ModelProto of a loaded SentencePiece model (its type, normalizer and piece types)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # the generated module needs protobuf
        raise ConversionError(f"reading the SentencePiece model's settings needs protobuf ({e}); "
                              f"pip install protobuf") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return proto


def _unigram_tokenizer_json(proto, sp, add_prefix_space: bool):
    """A `tokenizers` Unigram tokenizer with SentencePiece's pieces and scores, its control pieces as special
    tokens, its user-defined pieces as always-whole tokens, and SentencePiece's whitespace handling."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    piece_type = proto.SentencePiece
    tokenizer = Tokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=sp.unk_id(),
                                         byte_fallback=proto.trainer_spec.byte_fallback))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix_space else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                  for p in proto.pieces if p.type in (piece_type.CONTROL, piece_type.UNKNOWN)])
    tokenizer.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                          for p in proto.pieces if p.type == piece_type.USER_DEFINED])
    return tokenizer


@contextmanager
def staged_directory(target: str | os.PathLike, overwrite: bool = False,
                     protect: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target`, on any error it is
    removed, so a failed conversion leaves nothing (and an old `target` stays as it was).

    An existing non-empty `target` is refused unless overwrite; `protect` lists directories (the input)
    that target must neither be, contain, nor lie inside."""
    target = Path(target).absolute()
    for other in protect:
        other = Path(other).absolute()
        if target == other or other in target.parents or target in other.parents:
            raise ConversionError(f"the output directory {target} overlaps the input {other}; choose another one")
    if target.exists() and not target.is_dir():
        raise ConversionError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConversionError(f"{target} exists and is not empty; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)  # both renames stay on one filesystem, so each is atomic
            os.rename(staging, target)
            shutil.rmtree(old)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def run_tool(parser, convert: Callable, argv: list[str] | None) -> int:
    """main() of the conversion tools: 0 on success, 2 with a one-line "error: ..." on stderr for bad input."""
    import sys

    args = parser.parse_args(argv)
    try:
        convert(args)
    except ValueError as e:  # ConversionError and CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
