"""Activation recomputation (--recompute-activations), applied to a built model from outside (torchtitan style).

    model = GatedDeltaNetForCausalLM(config)
    parallelize_model(model, tp_group, sequence_parallel)      # optional, first
    apply_context_parallel(model, cp_group)                    # optional, first
    apply_activation_recompute(model, "selective")             # or "full"

Forward keeps fewer tensors for backward, and backward runs the forward of the checkpointed pieces again to get
them back (torch.utils.checkpoint, non-reentrant):

selective  each block's token mixer (`block.attn`): its projections' outputs, short convolutions, gate, delta rule
           and gated norm are not kept; only the mixer's input is. Costs one more forward of the mixers per step
           (14-15% more FLOPs for the small and 1.3B shapes) and leaves the MLP's activations stored.
full       each whole block: only the block's input (one [B, T, hidden] tensor per block) is kept. Costs one more
           forward of the blocks per step (28-32% more FLOPs for the same shapes); for the longest contexts.

Megatron's names, GDN's content: Megatron's "selective" recomputes the core attention, here it is the GDN mixer,
which is where a GDN block's activations are (q, k, v, the gate, the per-chunk intermediates).

Why it composes with the parallel code:
- The checkpointed function is the module's own forward (the instance's `forward` is replaced, so parameter names,
  state dicts, the sharding rules and the optimizer see no difference). Forward pre-hooks stay outside the
  recomputed part for `selective`: the tensor-parallel region entry (the sequence-parallel all-gather) runs once and
  its output is what is kept. For `full` the hooks of the mixer and MLP run inside the block and are recomputed with
  it, all-gather included; every rank recomputes the same layers in the same order, so the collectives of the
  recomputation (tensor parallel, the context-parallel state passing and halo) pair up like those of the forward.
- Gradients reach the parameters through the same hooks (TP-replicated weights, DeepSpeed's reduction), once per
  parameter use, so ZeRO and the built-in data-parallel path see the same gradients. ZeRO-3 gathers a module's
  partitioned parameters again when backward reaches the module, before its recomputation needs them.
- Autocast is recorded and replayed by torch.utils.checkpoint, so the recomputation runs in the same precision.
- Randomness: the model draws no random numbers in forward (no dropout; tests/test_recompute.py checks it), so the
  recomputation is exactly the forward. preserve_rng_state stays on (the default): it restores the default
  generators at each checkpoint, which is what a future dropout outside the RNG tracker would need. Dropout inside
  `RNGStatesTracker.fork()` (parallel/random.py) would also need the tracker's states restored, which this does not do.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

RECOMPUTE_GRANULARITIES = ("selective", "full")


def recompute_in_backward(module: nn.Module) -> None:
    """Make module's forward keep only its inputs and recompute the rest in backward, in place. Outside training
    (eval, or no gradient) the forward runs as it is: there is no backward, and caches must be updated once."""
    forward = module.forward  # the bound forward of the module's class

    @functools.wraps(forward)  # inspect.signature(module.forward) still shows the real arguments
    def checkpointed_forward(*args, **kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed_forward


def apply_activation_recompute(model: nn.Module, granularity: str) -> nn.Module:
    """Checkpoint every block's mixer (selective) or every whole block (full) of a GatedDeltaNetForCausalLM, in
    place; apply after tensor and context parallelism. Raises ValueError for an unknown granularity."""
    if granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"--recompute-granularity must be one of {', '.join(RECOMPUTE_GRANULARITIES)}; "
                         f"got {granularity!r}")
    for block in model.model.layers:
        recompute_in_backward(block.attn if granularity == "selective" else block)
    return model
