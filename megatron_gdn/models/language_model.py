"""The Gated DeltaNet language model: embeddings -> [norm -> GDN -> norm -> SwiGLU] x L -> norm -> lm head.

Names follow flash-linear-attention's `GatedDeltaNetForCausalLM` so state dicts line up with its
checkpoints (model.embeddings, model.layers.{i}.attn_norm / attn / mlp_norm / mlp, model.norm, lm_head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import swiglu
from .configuration import GatedDeltaNetConfig
from .gated_deltanet import GatedDeltaNet, RMSNorm
from .hf_conversion import DEFAULT_MAX_SHARD_SIZE, FLA, load_hf_model_state, write_hf_model
from .fused_projection import fused_projection
from .utils import Cache


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). backend picks the fused activation kernel (as RMSNorm's)."""

    def __init__(self, hidden_size: int, intermediate_size: int, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)), plus residual when given (added by the down projection's product)."""
        # [..., gate | up]: the activation reads both halves of one product and writes its gradient as one tensor
        return fused_projection(swiglu(fused_projection(x, self.gate_proj, self.up_proj), backend=self.backend),
                                self.down_proj, residual=residual)


class GatedDeltaNetBlock(nn.Module):
    """Pre-norm block: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)); the second residual add is fused
    into mlp_norm (one pass computes both the sum and its norm). The block's last add is the MLP's down
    projection's (a product that adds its residual): fusing it into the next block's attn_norm would make blocks
    pass (output, residual) pairs, and full activation recomputation, which keeps only each block's input, would
    then keep two hidden-sized tensors per block.
    attn_norm passes x on (prenorm) to be the residual: backward then adds the gradient of that use to its own
    inside its kernel, where two uses of x would take a separate add of two hidden-sized gradients."""

    def __init__(self, config: GatedDeltaNetConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GatedDeltaNet(
            hidden_size=config.hidden_size, expand_v=config.expand_v, head_dim=config.head_dim,
            num_heads=config.num_heads, num_v_heads=config.num_v_heads, mode=config.attn_mode,
            use_gate=config.use_gate, use_short_conv=config.use_short_conv,
            allow_neg_eigval=config.allow_neg_eigval, conv_size=config.conv_size, conv_bias=config.conv_bias,
            layer_idx=layer_idx, norm_eps=config.norm_eps)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, past_key_values: Cache | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        normed, x = self.attn_norm(x, prenorm=True)  # its norm, and x itself as the residual
        mixed, _, _ = self.attn(normed, past_key_values=past_key_values, use_cache=use_cache, cu_seqlens=cu_seqlens)
        normed, x = self.mlp_norm(mixed, residual=x)  # x + mixed, and its norm
        return self.mlp(normed, residual=x)


class GatedDeltaNetModel(nn.Module):
    """Embeddings, the blocks, and the final norm; returns the last hidden states."""

    def __init__(self, config: GatedDeltaNetConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GatedDeltaNetBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        # Under autocast the residual stream (the embeddings' output, every block's sums and the blocks' inputs)
        # is kept in the autocast dtype, as Megatron-LM keeps it under --bf16 and as a bf16 model does: half the
        # bytes of every hidden state kept for backward (the block inputs that full recomputation keeps: 42 GiB for
        # the 1.3b model at 256K tokens in fp32, 21 in bf16) and of the adds' and norms' traffic. True keeps it in fp32
        # (pretrain_gdn's --fp32-residual-connection). Without autocast it has the parameters' dtype either way.
        self.fp32_residual = False

    def forward(self, input_ids: torch.Tensor, past_key_values: Cache | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids)
        if not self.fp32_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for layer in self.layers:
            x = layer(x, past_key_values=past_key_values, use_cache=use_cache, cu_seqlens=cu_seqlens)
        return self.norm(x)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    past_key_values: Cache | None = None
    last_hidden_state: torch.Tensor | None = None  # only with return_hidden=True (and then no logits)


class GatedDeltaNetForCausalLM(nn.Module):
    """The language model with flash-linear-attention's interface.

    forward(input_ids, labels=None, past_key_values=None, use_cache=False, cu_seqlens=None) -> CausalLMOutput.
    labels are shifted inside (Hugging Face convention: pass labels = input_ids); -100 is ignored.
    return_hidden=True skips the lm head and returns the final norm's output as last_hidden_state (logits None),
    for a loss that applies the head itself without forming the logits (parallel.lm_head_cross_entropy).
    """

    def __init__(self, config: GatedDeltaNetConfig) -> None:
        super().__init__()
        self.config = config
        self.model = GatedDeltaNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every weight (N(0, initializer_range); norms 1; the GDN decay parameters as designed)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, GatedDeltaNet):
                module.reset_parameters(std, generator)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding masks are not supported: pack the sequences and pass cu_seqlens instead")
        if return_hidden and labels is not None:
            raise ValueError("return_hidden=True skips the lm head, so there are no logits to compute a loss from: "
                             "pass labels without it, or apply the head to last_hidden_state yourself")
        if use_cache and past_key_values is None:
            past_key_values = Cache()
        hidden = self.model(input_ids, past_key_values=past_key_values, use_cache=use_cache, cu_seqlens=cu_seqlens)
        if return_hidden:
            return CausalLMOutput(past_key_values=past_key_values if use_cache else None, last_hidden_state=hidden)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
            loss = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss, past_key_values=past_key_values if use_cache else None)

    def save_pretrained(self, save_directory: str, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                        dtype: torch.dtype = torch.float32) -> None:
        """Write a Hugging Face directory in flash-linear-attention's format (config.json, generation_config.json,
        model.safetensors, sharded above max_shard_size). The vocabulary is written as it is: padding rows
        stay (tools/convert_checkpoint_to_hf.py removes them and adds the tokenizer)."""
        write_hf_model(save_directory, self.config, self.state_dict(), FLA, dtype, max_shard_size)

    @classmethod
    def from_pretrained(cls, directory: str, allow_pickle: bool = False) -> "GatedDeltaNetForCausalLM":
        """Load an fla-format (or qwen3_next-format) Hugging Face directory in fp32 on the CPU.

        Reads config.json as JSON and the weights from safetensors only; pickle-based weights are refused
        unless allow_pickle (see hf_conversion.load_hf_weights). Nothing in the directory is executed."""
        config, state, _ = load_hf_model_state(directory, allow_pickle)
        model = cls(config)
        model.load_state_dict(state)
        return model

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue each prompt of input_ids [B, T] (equal lengths) by up to max_new_tokens tokens.

        Greedy by default; do_sample=True samples from softmax(logits / temperature) restricted to the
        top_k tokens (0 = all) and the smallest set whose probability reaches top_p. The prompt is
        prefilled once and every new token costs one recurrent step with the cache. Finished sequences
        (eos_token_id) are padded with eos. Returns [B, T + generated].
        """
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be positive when sampling, got {temperature}")
        was_training = self.training
        self.eval()
        cache = Cache()
        logits = self(input_ids, past_key_values=cache, use_cache=True).logits[:, -1]
        tokens = [input_ids]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits, do_sample, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_token = torch.where(finished, eos_token_id, next_token)
                finished |= next_token == eos_token_id
            tokens.append(next_token[:, None])
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            logits = self(next_token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        self.train(was_training)
        return torch.cat(tokens, dim=1)


def sample_next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy (argmax) or temperature / top-k / top-p sampling from logits [B, vocab]."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
