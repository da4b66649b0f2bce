"""The GDN layer and language model: API, parameter budget, initialisation, cache, varlen, generation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_gdn.kernels import fp32_products_of_bf16
from megatron_gdn.kernels.reference import l2norm, recurrent_gated_delta_rule
from megatron_gdn.models import (MODEL_PRESETS, Cache, GatedDeltaNet, GatedDeltaNetConfig, GatedDeltaNetForCausalLM,
                                 ShortConvolution)
from megatron_gdn.models.language_model import sample_next_token
from megatron_gdn.models.fused_projection import ACCUMULATE_IN_PRODUCT, fused_projection, fused_projections


def small_config(**overrides) -> GatedDeltaNetConfig:
    values = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16)
    return GatedDeltaNetConfig(**{**values, **overrides})


def test_layer_api_and_shapes():
    layer = GatedDeltaNet(hidden_size=96, num_heads=2, head_dim=16, num_v_heads=4, layer_idx=0)
    x = torch.randn(2, 70, 96)
    out, attentions, cache = layer(x)
    assert out.shape == x.shape and attentions is None and cache is None
    cache = Cache()
    out2, _, cache = layer(x, past_key_values=cache, use_cache=True)
    assert cache[0].recurrent_state.shape == (2, 4, 16, 32) and cache[0].recurrent_state.dtype == torch.float32
    assert [c.shape for c in cache[0].conv_state] == [(2, 3, 32), (2, 3, 32), (2, 3, 128)]


@pytest.mark.parametrize("hidden", [1024, 2048])
def test_mixer_parameter_budget_is_six_hidden_squared(hidden):
    """key_dim = 0.75 hidden, expand_v = 2: q, k 0.75 h^2 each; v, g, o 1.5 h^2 each (DESIGN section 2)."""
    head_dim = 256 if hidden == 2048 else 64
    layer = GatedDeltaNet(hidden_size=hidden, head_dim=head_dim, num_heads=3 * hidden // 4 // head_dim)
    HV, W = layer.A_log.numel(), 4
    key_dim, value_dim = 3 * hidden // 4, 3 * hidden // 2
    exact = 6 * hidden ** 2 + 2 * HV * hidden + W * (2 * key_dim + value_dim) + 2 * HV + layer.head_v_dim
    count = sum(p.numel() for p in layer.parameters())
    assert count == exact
    assert abs(count / (6 * hidden ** 2) - 1) < 0.01


def test_no_gate_budget_with_key_dim_hidden():
    """Without the output gate, key_dim = hidden keeps ~6 h^2 (q, k: 1 each; v, o: 2 each)."""
    hidden = 512
    cfg = GatedDeltaNetConfig(hidden_size=hidden, head_dim=64, num_heads=None, use_gate=False, vocab_size=10)
    assert cfg.num_heads * cfg.head_dim == hidden
    layer = GatedDeltaNetForCausalLM(cfg).model.layers[0].attn
    matrices = sum(p.numel() for n, p in layer.named_parameters() if n.endswith("proj.weight") and p.shape[0] > 64)
    assert matrices == 6 * hidden ** 2


def test_presets():
    expected = {"tiny": (256, 6, 4, 64), "small": (768, 12, 12, 64), "medium": (1024, 24, 16, 64),
                "large": (1280, 36, 20, 64), "1.3b": (2048, 21, 6, 256)}
    for name, (h, layers, heads, hd) in expected.items():
        cfg = GatedDeltaNetConfig.from_preset(name, vocab_size=32000)
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_heads, cfg.head_dim) == (h, layers, heads, hd)
    assert set(MODEL_PRESETS) == set(expected)
    # The GPT-2-small-size preset has fla's parameter count for this shape (163M with vocab 32000).
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig.from_preset("small", vocab_size=32000))
    assert 162e6 < sum(p.numel() for p in model.parameters()) < 164e6
    # The 1.3B preset is fla's default shape: its SwiGLU width (256 x ceil(2048 x 4 x 2/3 / 256)) and 1.39B
    # parameters with vocab 32000 (counted on the meta device: no memory for the weights).
    with torch.device("meta"):
        model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig.from_preset("1.3b", vocab_size=32000))
    assert model.config.intermediate_size == 5632
    assert 1.385e9 < sum(p.numel() for p in model.parameters()) < 1.395e9


def test_initialisation():
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(small_config(hidden_size=256, num_heads=4, head_dim=64, num_hidden_layers=4))
    attn = model.model.layers[0].attn
    A = torch.cat([layer.attn.A_log for layer in model.model.layers]).exp()
    assert A.dtype == torch.float32 and attn.dt_bias.dtype == torch.float32
    assert A.min() > 0 and A.max() <= 16
    dt = torch.cat([F.softplus(layer.attn.dt_bias) for layer in model.model.layers])
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    assert abs(attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(model.model.embeddings.weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.model.layers[0].attn_norm.weight, torch.ones(256))
    # Same seed, same weights: initialisation is reproducible.
    torch.manual_seed(0)
    again = GatedDeltaNetForCausalLM(small_config(hidden_size=256, num_heads=4, head_dim=64, num_hidden_layers=4))
    for (n, p), (_, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, p2), n


def test_layer_matches_written_out_math():
    """The mixer equals its definition composed from plain ops and the per-token oracle."""
    torch.manual_seed(0)
    layer = GatedDeltaNet(hidden_size=32, num_heads=2, head_dim=8, num_v_heads=4, expand_v=1.5, norm_eps=1e-6).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    out, _, _ = layer(x)

    def conv(proj, conv_layer):
        y = F.conv1d(F.pad(proj(x).transpose(1, 2), (3, 0)), conv_layer.weight, groups=proj.out_features)
        return F.silu(y.transpose(1, 2))

    q = l2norm(conv(layer.q_proj, layer.q_conv1d).view(2, 20, 2, 8))
    k = l2norm(conv(layer.k_proj, layer.k_conv1d).view(2, 20, 2, 8))
    v = conv(layer.v_proj, layer.v_conv1d).view(2, 20, 4, 12)
    g = -layer.A_log.double().exp() * F.softplus(layer.a_proj(x) + layer.dt_bias)
    beta = layer.b_proj(x).sigmoid()
    o, _ = recurrent_gated_delta_rule(q, k, v, g, beta)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.o_norm.weight
    o = o * F.silu(layer.g_proj(x).view(2, 20, 4, 12))
    torch.testing.assert_close(out, layer.o_proj(o.reshape(2, 20, 48)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("overrides", [{}, {"num_v_heads": 4, "allow_neg_eigval": True},
                                       {"use_gate": False, "use_short_conv": False}])
def test_prefill_then_decode_equals_full_forward(overrides):
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(small_config(**overrides)).eval()
    ids = torch.randint(0, 97, (3, 90))
    full = model(ids).logits
    cache = Cache()
    pieces = [model(ids[:, :70], past_key_values=cache, use_cache=True).logits]  # chunked prefill
    pieces.append(model(ids[:, 70:72], past_key_values=cache, use_cache=True).logits)  # shorter than the conv
    for t in range(72, 90):  # token-by-token decoding
        pieces.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert cache.get_seq_length() == 90
    got = torch.cat(pieces, dim=1)
    assert ((got - full).norm() / full.norm()).item() < 1e-5


def test_packed_documents_equal_separate_runs():
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(small_config())
    lengths = [5, 1, 40, 2, 30]
    ids = torch.randint(0, 97, (1, sum(lengths)))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packed = model(ids, cu_seqlens=cu).logits
    separate = torch.cat([model(ids[:, a:b]).logits for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


def test_short_convolution_varlen_and_cache():
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4, bias=True)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(1, 12, 6)
    full, tail = conv(x)
    reference = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, conv.bias, groups=6)).transpose(1, 2)
    torch.testing.assert_close(full, reference)
    torch.testing.assert_close(tail, x[:, -3:])
    first, tail1 = conv(x[:, :5])
    rest, _ = conv(x[:, 5:], past=tail1)
    torch.testing.assert_close(torch.cat([first, rest], 1), full)
    packed, _ = conv(x, cu_seqlens=torch.tensor([0, 2, 12]))
    torch.testing.assert_close(packed, torch.cat([conv(x[:, :2])[0], conv(x[:, 2:])[0]], 1))


def test_loss_shifts_labels_inside():
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(small_config())
    ids = torch.randint(0, 97, (2, 16))
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_generate_greedy_equals_uncached_argmax_loop():
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(small_config()).eval()
    prompt = torch.randint(0, 97, (2, 7))
    out = model.generate(prompt, max_new_tokens=12)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_generate_stops_at_eos_and_samples_reproducibly():
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(small_config()).eval()
    prompt = torch.randint(0, 97, (2, 5))
    greedy = model.generate(prompt, max_new_tokens=6)
    eos = int(greedy[0, 6])  # the second generated token of row 0
    stopped = model.generate(prompt, max_new_tokens=6, eos_token_id=eos)
    assert (stopped[0, 6:] == eos).all()
    a = model.generate(prompt, 8, do_sample=True, temperature=0.7, top_k=10, top_p=0.9,
                       generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 8, do_sample=True, temperature=0.7, top_k=10, top_p=0.9,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 13)


def test_sampling_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    top_k = {int(sample_next_token(logits, True, 1.0, 2, 1.0, gen)) for _ in range(200)}
    assert top_k == {0, 1}
    top_p = {int(sample_next_token(logits, True, 1.0, 0, 0.8, gen)) for _ in range(300)}
    assert top_p == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are cut
    top_p = {int(sample_next_token(logits, True, 1.0, 0, 0.81, gen)) for _ in range(300)}
    assert top_p == {0, 1, 2}


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=4, num_v_heads=6), "multiple of num_heads"),
    (dict(head_dim=10, expand_v=0.25), "integer"),
    (dict(hidden_size=0), "hidden_size must be positive"),
    (dict(num_heads=None, hidden_size=100), "cannot derive num_heads"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_config(**kwargs)


def test_config_dict_round_trip():
    cfg = small_config(num_v_heads=4)
    assert GatedDeltaNetConfig.from_dict({**cfg.to_dict(), "unknown_future_field": 1}) == cfg
    assert math.isclose(cfg.head_v_dim, 32)


def test_fused_projections_equal_separate_linears():
    """The mixer's and MLP's projections of one input as one product: values and every gradient as separate
    nn.Linear calls give (fp64: the same up to summation order), the packed form is their concatenation, and under
    autocast the outputs are in its dtype with gradients within bf16 rounding; a layer with a bias is called as it
    is (and the packed form concatenates the calls); one layer is the plain linear."""
    check_fused_projections("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_projections_equal_separate_linears_gpu():
    """The same on the GPU, where the weights' fp32 gradients come straight out of the bf16 product."""
    assert fp32_products_of_bf16(torch.device("cuda")), "torch.mm(out_dtype=float32) of bf16 is unavailable here"
    check_fused_projections("cuda")


def test_gradient_accumulation_fusion_adds_into_one_buffer():
    """Parameters marked for gradient accumulation fusion (as the built-in engine marks them): the plain
    projections' weight gradients are written, then added, by their products into views of one buffer per product,
    which stay the .grad tensors from micro batch to micro batch; the gradients equal autograd's accumulation of
    the same micro batches in an unmarked copy of the model (fp64: up to summation order), also after an in-place
    zero_grad (--cuda-graph) and after set_to_none (the next micro batch starts a new buffer)."""
    torch.manual_seed(0)
    fused = GatedDeltaNetForCausalLM(small_config()).double()
    plain = copy.deepcopy(fused)
    for param in fused.parameters():
        setattr(param, ACCUMULATE_IN_PRODUCT, True)
    batches = [torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def micro_batch(model, i):
        logits = model(batches[i]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batches[i].roll(-1, 1).flatten()).backward()

    def same_gradients():
        for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)

    mixer = fused.model.layers[0].attn
    projections = [mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.a_proj, mixer.b_proj, mixer.g_proj]
    for model in (fused, plain):
        micro_batch(model, 0)
    buffer = projections[0].weight.grad._base
    assert buffer is not None and all(p.weight.grad._base is buffer for p in projections)
    assert plain.model.layers[0].attn.q_proj.weight.grad._base is None  # autograd's own tensor
    grads = [p.grad for p in fused.parameters()]
    for model in (fused, plain):
        micro_batch(model, 1)  # accumulated: the product adds into the buffer
    assert all(p.grad is g for p, g in zip(fused.parameters(), grads))
    same_gradients()
    for set_to_none in (False, True):
        for model in (fused, plain):
            model.zero_grad(set_to_none=set_to_none)
            micro_batch(model, 2)
        same_gradients()
    assert projections[0].weight.grad._base is not buffer  # set_to_none: a new buffer


def check_fused_projections(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    layers = [torch.nn.Linear(24, n, bias=False).double().to(device) for n in (16, 16, 40, 3)]
    layers[2].weight.requires_grad_(False)
    cotangents = [torch.randn(2, 7, layer.out_features, dtype=torch.float64, generator=gen).to(device)
                  for layer in layers]

    def grads(x, outputs):
        loss = sum((o.double() * c).sum() for o, c in zip(outputs, cotangents))
        return torch.autograd.grad(loss, [x] + [layer.weight for layer in layers if layer.weight.requires_grad])

    x = torch.randn(2, 7, 24, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    (ours, shared), separate = fused_projections(x, *layers), [layer(x) for layer in layers]
    assert shared is not None
    for o, r in zip(ours, separate):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    assert all(o._base is ours[0]._base is not None for o in ours)  # views of one product
    with torch.no_grad():  # no autograd: plain slices, nothing to share
        plain, no_shared = fused_projections(x, *layers)
    assert no_shared is None and all(torch.equal(p, o) for p, o in zip(plain, ours))
    torch.testing.assert_close(fused_projection(x, *layers), torch.cat(separate, -1), rtol=1e-12, atol=1e-12)
    for g, r in zip(grads(x, ours), grads(x, separate)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    one = fused_projection(x, layers[0])  # the plain linear
    torch.testing.assert_close(one, layers[0](x), rtol=1e-12, atol=1e-12)
    for g, r in zip(torch.autograd.grad(one.sum(), [x, layers[0].weight]),
                    torch.autograd.grad(layers[0](x).sum(), [x, layers[0].weight])):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    residual = torch.randn(2, 7, 16, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    c = cotangents[0]
    plus = fused_projection(x, layers[0], residual=residual)  # the product adds the residual
    torch.testing.assert_close(plus, residual + layers[0](x), rtol=1e-12, atol=1e-12)
    for g, r in zip(torch.autograd.grad((plus * c).sum(), [x, layers[0].weight, residual]),
                    torch.autograd.grad(((residual + layers[0](x)) * c).sum(), [x, layers[0].weight, residual])):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)

    x32 = x.detach().float().requires_grad_()
    for layer in layers:
        layer.float()
    with torch.autocast(device, dtype=torch.bfloat16):
        (ours, _), separate = fused_projections(x32, *layers), [layer(x32) for layer in layers]
    assert all(o.dtype == torch.bfloat16 for o in ours)
    for o, r in zip(ours, separate):
        torch.testing.assert_close(o, r, rtol=0, atol=0)  # the same casts and products
    for g, r in zip(grads(x32, ours), grads(x32, separate)):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-2)  # bf16 sums in another order
    for res in (residual.detach().bfloat16(), residual.detach().float()):  # the product's dtype, or promoted
        with torch.autocast(device, dtype=torch.bfloat16):
            plus, ref = fused_projection(x32, layers[0], residual=res), res + layers[0](x32)
        assert plus.dtype == ref.dtype
        torch.testing.assert_close(plus, ref, rtol=1e-2, atol=1e-2)  # one rounding where the add made two

    biased = torch.nn.Linear(24, 5).to(device)
    outputs, shared = fused_projections(x32, biased)
    torch.testing.assert_close(outputs[0], biased(x32))
    assert shared is None
    torch.testing.assert_close(fused_projection(x32, biased, layers[0]), torch.cat([biased(x32), layers[0](x32)], -1))
    torch.testing.assert_close(fused_projection(x32, biased), biased(x32))  # one layer that cannot fuse: its call
