"""DeepSpeed ZeRO checkpoints: their layout, a safety check, and consolidation into the full per-TP-rank state.

A run under `--zero-stage 1|2|3` saves with DeepSpeed's engine.save_checkpoint, tag = our iteration directory:

    SAVE/latest_checkpointed_iteration.txt                                  ours, written last (checkpointing.py)
    SAVE/iter_0000500/mp_rank_{tp:02d}_model_states.pt                      ZeRO 1/2: the module, parameter shapes and
                                                                            our client state (iteration, RNG, args, ...)
    SAVE/iter_0000500/zero_pp_rank_{dp}_mp_rank_{tp:02d}_model_states.pt    ZeRO 3: the same, one per DP rank
    SAVE/iter_0000500/[bf16_]zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt
                                                                            DP rank dp's partition of the fp32 weights
                                                                            and Adam moments of TP rank tp

`read_deepspeed_rank_state` rebuilds, from all DP partitions of one TP rank, the state the built-in path saves
(checkpointing.py): "model" (full fp32 weights of the TP shard), "optimizer" (an AdamW state dict numbered in
parameter-group order), "optimizer_param_names", plus the client state. Every reader of checkpoints
(resume at another data-parallel size or ZeRO stage, tools/reshard_checkpoint.py, the Hugging Face export)
goes through it, so a ZeRO checkpoint is readable wherever a built-in one is.

DeepSpeed pickles four of its own types into these files. They are read with torch.load(weights_only=True),
the four names mapped to an inert record class, so neither DeepSpeed nor any code from the file runs. DeepSpeed's
own loader unpickles everything; before a same-layout resume hands it the files, `check_deepspeed_pickles`
refuses any file that references anything beyond tensors, plain data and those four types.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from .checkpointing import CheckpointError

# The DeepSpeed classes found in ZeRO checkpoints (0.16 - 0.19): an enum, a dataclass and two loss scalers.
DEEPSPEED_TYPES = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
                   "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")
# Entries of a model-states file that are DeepSpeed's; everything else is our client state.
DEEPSPEED_KEYS = frozenset({"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
                            "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd",
                            "sparse_tensor_module_names", "skipped_steps", "global_steps", "global_samples",
                            "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config",
                            "ds_version"})
_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_FILE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")


class DeepSpeedRecord:
    """Stands in for a DeepSpeed object while reading a checkpoint: it keeps the constructor arguments
    (ZeroStageEnum(2) -> args == (2,)) or the pickled attributes (fragment_address.start, .numel)."""

    def __init__(self, *args) -> None:
        self.args = args

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def torch_load_deepspeed(path: Path) -> dict:
    """torch.load(weights_only=True) of a DeepSpeed file, DeepSpeed's types read as DeepSpeedRecord."""
    try:
        with torch.serialization.safe_globals([(DeepSpeedRecord, name) for name in DEEPSPEED_TYPES]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds Python objects other than tensors, plain data and DeepSpeed's "
                              f"checkpoint types; refusing to load it, since unpickling them could run code "
                              f"({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              f"{str(e).splitlines()[0]}") from None


def check_deepspeed_pickles(directory: Path) -> None:
    """Refuse a DeepSpeed checkpoint directory any of whose files references other Python globals than
    torch's weights-only set and DEEPSPEED_TYPES (DeepSpeed itself loads with weights_only=False)."""
    for path in sorted(directory.glob("*.pt")):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                                  f"{str(e).splitlines()[0]}") from None
        extra = sorted(set(unsafe) - set(DEEPSPEED_TYPES))
        if extra:
            raise CheckpointError(f"{path} references Python objects {extra[:3]} besides tensors, plain data and "
                                  f"DeepSpeed's checkpoint types; refusing to load it, since unpickling them could "
                                  f"run code")


def is_deepspeed_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and any(_MODEL_FILE.match(p.name) for p in directory.iterdir())


def deepspeed_layout(directory: Path) -> dict:
    """What a DeepSpeed iteration directory holds: {"tensor_parallel_size", "data_parallel_size", "stage_3",
    "bf16_prefix"} (the DP size is the number of ZeRO partitions of TP rank 0)."""
    tp_ranks, dp_ranks, stage_3, bf16 = set(), set(), False, False
    for p in directory.iterdir():
        if m := _MODEL_FILE.match(p.name):
            tp_ranks.add(int(m.group(2)))
            stage_3 |= m.group(1) is not None
        if m := _OPTIM_FILE.match(p.name):
            bf16 |= m.group(1) is not None
            if int(m.group(3)) == 0:
                dp_ranks.add(int(m.group(2)))
    return {"tensor_parallel_size": len(tp_ranks), "data_parallel_size": len(dp_ranks), "stage_3": stage_3,
            "bf16_prefix": bf16}


def model_states_file(directory: Path, tp_rank: int) -> Path:
    """The file holding TP rank tp_rank's client state and parameter shapes (ZeRO 3: DP rank 0's copy)."""
    for name in (f"mp_rank_{tp_rank:02d}_model_states.pt", f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt"):
        if (directory / name).exists():
            return directory / name
    raise CheckpointError(f"{directory} has no model-states file for tensor-parallel rank {tp_rank} "
                          f"(mp_rank_{tp_rank:02d}_model_states.pt); the checkpoint is incomplete or was moved")


def read_client_state(directory: Path, tp_rank: int) -> dict:
    """Our client state (iteration, RNG, args, model config, ...) saved with TP rank tp_rank's model states."""
    states = torch_load_deepspeed(model_states_file(directory, tp_rank))
    return {key: value for key, value in states.items() if key not in DEEPSPEED_KEYS}


def read_deepspeed_rank_state(directory: Path, tp_rank: int, with_optimizer: bool = True) -> dict:
    """TP rank tp_rank's full state in the built-in checkpoint format, consolidated from its ZeRO partitions.

    "model" holds fp32 weights (the fp32 master copy ZeRO keeps, not the bf16 working copy), with tied
    weights under both names as model.state_dict() has them."""
    states = torch_load_deepspeed(model_states_file(directory, tp_rank))
    client = {key: value for key, value in states.items() if key not in DEEPSPEED_KEYS}
    shapes: list[dict] = states["param_shapes"]
    if isinstance(shapes, dict):
        shapes = [shapes]
    dp = int(states["dp_world_size"])
    partitions = []
    for dp_rank in range(dp):
        path = _optim_file(directory, dp_rank, tp_rank)
        partitions.append(torch_load_deepspeed(path)["optimizer_state_dict"])
    if "single_partition_of_fp32_groups" in partitions[0]:
        weights, moments, steps, param_groups = _consolidate_flat_partitions(partitions, shapes)
    elif "fp32_flat_groups" in partitions[0]:
        weights, moments, steps, param_groups = _consolidate_stage3_partitions(partitions, shapes)
    else:
        raise CheckpointError(f"{directory}: unrecognised ZeRO optimizer state (keys {sorted(partitions[0])[:8]}); "
                              f"was it written by another DeepSpeed version?")
    names = [name for group in shapes for name in group]
    model = dict(weights)
    for alias, source in (states.get("shared_params") or {}).items():  # tied weights: one tensor, two names
        model[alias] = weights[source]
    state = {**client, "model": model, "optimizer_param_names": names, "deepspeed_zero_stage": _stage(partitions[0]),
             "deepspeed_data_parallel_size": dp}
    if with_optimizer and moments:
        index, adam_state, groups = 0, {}, []
        for g, group in enumerate(shapes):
            first = index
            for name in group:
                adam_state[index] = {"step": steps[g].clone(), **{k: moments[k][name] for k in moments}}
                index += 1
            groups.append({**param_groups[g], "params": list(range(first, index))})
        state["optimizer"] = {"state": adam_state, "param_groups": groups}
    return state


def _optim_file(directory: Path, dp_rank: int, tp_rank: int) -> Path:
    for prefix in ("", "bf16_"):
        path = directory / f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"
        if path.exists():
            return path
    raise CheckpointError(f"{directory} lacks the ZeRO partition of data-parallel rank {dp_rank} for tensor-parallel "
                          f"rank {tp_rank} (zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt); the "
                          f"checkpoint is incomplete")


def _stage(partition: dict) -> int:
    stage = partition.get("zero_stage")
    if isinstance(stage, DeepSpeedRecord) and stage.args:
        return int(stage.args[0])
    return 1  # DeepSpeed's bf16 optimizer (ZeRO 1 with fp32 gradient accumulation) records no stage


def _consolidate_flat_partitions(partitions: list[dict], shapes: list[dict]):
    """ZeRO 1/2 (and DeepSpeed's bf16 optimizer): each parameter group is one flat fp32 buffer split into DP
    partitions; `param_slice_mappings` gives, per partition, where each parameter's piece starts. A parameter's
    pieces in DP-rank order are its flattened values."""
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    steps, param_groups = [], []
    for g, group in enumerate(shapes):
        base = [p["base_optimizer_state"] for p in partitions]
        if "state" not in base[0] or not isinstance(base[0]["state"], dict):
            raise CheckpointError("ZeRO optimizer state saved with zero_optimization.elastic_checkpoint cannot be "
                                  "consolidated; train with elastic_checkpoint off")
        adam = [b["state"].get(g, {}) for b in base]
        pieces: dict[str, dict[str, list[torch.Tensor]]] = {n: {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
                                                            for n in group}
        for rank, partition in enumerate(partitions):
            flat = {"fp32": partition["single_partition_of_fp32_groups"][g], **{k: adam[rank].get(k) for k in moments}}
            for name, address in partition["param_slice_mappings"][g].items():
                for key, buffer in flat.items():
                    if buffer is not None:
                        pieces[name][key].append(buffer.narrow(0, address.start, address.numel))
        for name, shape in group.items():
            weights[name] = _joined(pieces[name]["fp32"], shape, name)
            for key in moments:
                if pieces[name][key]:
                    moments[key][name] = _joined(pieces[name][key], shape, name)
        steps.append(adam[0].get("step", torch.tensor(0.0)))
        param_groups.append({k: v for k, v in base[0]["param_groups"][g].items() if k != "params"})
    return weights, ({} if not moments["exp_avg"] else moments), steps, param_groups


def _consolidate_stage3_partitions(partitions: list[dict], shapes: list[dict]):
    """ZeRO 3: every parameter is split on its own into DP pieces of ceil(numel / DP) (the last one padded); a
    rank's flat buffer is its pieces of all parameters, in order (zero_to_fp32's layout)."""
    dp = len(partitions)
    flat = {"fp32": [torch.cat(p["fp32_flat_groups"]) for p in partitions]}
    adam_states = [p["optimizer_state_dict"]["state"] for p in partitions]
    sub_groups = sorted(adam_states[0])
    for key in ("exp_avg", "exp_avg_sq"):
        if sub_groups and all(key in adam_states[0][i] for i in sub_groups):
            flat[key] = [torch.cat([s[i][key] for i in sub_groups]) for s in adam_states]
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {k: {} for k in flat if k != "fp32"}
    offset = 0
    for group in shapes:
        for name, shape in group.items():
            numel = int(torch.Size(shape).numel())
            piece = -(-numel // dp)
            for key, buffers in flat.items():
                full = torch.cat([b.narrow(0, offset, piece) for b in buffers])[:numel].view(shape).clone()
                (weights if key == "fp32" else moments[key])[name] = full
            offset += piece
    step = adam_states[0][sub_groups[0]]["step"] if sub_groups else torch.tensor(0.0)
    param_groups = [{k: v for k, v in g.items() if k != "params"}
                    for g in partitions[0]["optimizer_state_dict"]["param_groups"]]
    if len(param_groups) != len(shapes):
        raise CheckpointError(f"ZeRO-3 checkpoint has {len(param_groups)} optimizer groups for {len(shapes)} "
                              f"parameter groups; set zero_optimization.sub_group_size above the model size")
    return weights, moments, [step] * len(shapes), param_groups


def _joined(pieces: list[torch.Tensor], shape, name: str) -> torch.Tensor:
    flat = torch.cat(pieces) if pieces else torch.empty(0)
    if flat.numel() != torch.Size(shape).numel():
        raise CheckpointError(f"ZeRO partitions of {name} hold {flat.numel()} values for shape {tuple(shape)}; "
                              f"a partition file is missing or from another run")
    return flat.view(shape).clone()
