"""The DeepSpeed configuration of a run: built from the Megatron flags, optionally overridden by --deepspeed-config.

    --zero-stage 1|2|3                 DeepSpeed is the data-parallel engine, configured from the flags below
    --deepspeed-config ds.json         the same, with the file's keys added (ZeRO bucket sizes, offload, ...)
    --zero-stage 0 (or neither flag)   the built-in data-parallel path, no DeepSpeed (training/engine.py says why)

What the flags decide, the file may repeat but not contradict (a contradiction is an error naming both):

    flag                                     DeepSpeed key
    --micro-batch-size                       train_micro_batch_size_per_gpu
    --global-batch-size                      train_batch_size (in samples, Megatron's meaning; see below)
    --global-batch-size / (micro x DP)       gradient_accumulation_steps
    --clip-grad                              gradient_clipping
    --bf16 / --fp16                          bf16.enabled / fp16.enabled
    --zero-stage                             zero_optimization.stage
    --adam-beta1/2, --adam-eps, --weight-decay   optimizer.params betas, eps, weight_decay (if the file has them)

The learning rate is ours (set every step from --lr and the decay style), so a "scheduler" section is refused.
Keys DeepSpeed does not know are refused (DeepSpeed itself ignores unknown top-level keys silently, which turns a
typo into a setting that does nothing). DeepSpeed's data-parallel world is DP x CP (parallel/mpu.py): the
train_batch_size handed to it is micro x accumulation x DP x CP, which equals --global-batch-size when CP = 1.
"""

from __future__ import annotations

import difflib
import json
import os

from ..config import TrainingConfig

# fp16 loss scaling as in Megatron/DeepSpeed templates: dynamic (loss_scale 0), starting at 2^16 like
# torch.amp.GradScaler, halved after `hysteresis` overflows, doubled after 1000 clean steps.
FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1}
# Keys of the file whose values must equal what the flags say; (path in the DeepSpeed config, flag).
_AGREEING_KEYS = (
    (("train_micro_batch_size_per_gpu",), "--micro-batch-size"),
    (("gradient_clipping",), "--clip-grad"),
    (("zero_optimization", "stage"), "--zero-stage"),
    (("bf16", "enabled"), "--bf16"),
    (("fp16", "enabled"), "--fp16"),
    (("optimizer", "params", "betas"), "--adam-beta1/--adam-beta2"),
    (("optimizer", "params", "eps"), "--adam-eps"),
    (("optimizer", "params", "weight_decay"), "--weight-decay"),
)


def read_deepspeed_config(path: str) -> dict:
    """The JSON object of a --deepspeed-config file, or a clear error."""
    if not os.path.isfile(path):
        raise ValueError(f"--deepspeed-config {path}: no such file")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed-config {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed-config {path} must hold a JSON object, got {type(config).__name__}")
    return config


def resolve_zero_stage(cfg: TrainingConfig, file_config: dict | None) -> int:
    """The ZeRO stage of the run (0: the built-in path) from --zero-stage and the file's zero_optimization.stage."""
    file_stage = None  # a file that does not name a stage leaves it to --zero-stage (DeepSpeed's default is 0)
    if file_config is not None:
        file_stage = file_config.get("zero_optimization", {}).get("stage")
    if cfg.zero_stage is not None and file_stage is not None and cfg.zero_stage != file_stage:
        raise ValueError(f"--zero-stage {cfg.zero_stage} contradicts zero_optimization.stage {file_stage} of "
                         f"--deepspeed-config {cfg.deepspeed_config}: give one of them, or make them equal")
    stage = cfg.zero_stage if cfg.zero_stage is not None else (file_stage or 0)
    if stage == 0 and file_config is not None:
        raise ValueError(f"--deepspeed-config {cfg.deepspeed_config} asks for ZeRO stage 0, which is the built-in "
                         f"data-parallel path without DeepSpeed: drop --deepspeed-config, or set "
                         f"zero_optimization.stage to 1, 2 or 3")
    return stage


def build_deepspeed_config(cfg: TrainingConfig, zero_stage: int, data_parallel_size: int,
                           context_parallel_size: int) -> dict:
    """DeepSpeed's configuration from the flags alone (see the module docstring for the mapping)."""
    accumulation = cfg.global_batch_size // (cfg.micro_batch_size * data_parallel_size)
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.micro_batch_size * accumulation * data_parallel_size * context_parallel_size,
        "gradient_clipping": cfg.clip_grad,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": cfg.bf16},
        "fp16": {"enabled": cfg.fp16, **FP16_DEFAULTS},
        # The console line and TensorBoard are ours; DeepSpeed's own progress print would repeat them.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # Every rank must save under the same tag (our iter_XXXXXXX); a mismatch is a bug, not a warning.
        "checkpoint": {"tag_validation": "Fail"},
    }
    if cfg.bf16:
        # Accumulate and reduce bf16 gradients in fp32 (Megatron's main grads): summing micro batches in bf16
        # loses the small ones. The fp32 master weights and Adam moments are ZeRO-partitioned as usual.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def known_top_level_keys(config: dict, mpu=None) -> set[str]:
    """The top-level keys DeepSpeed's config parser reads (found by watching it parse `config`)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Keys:
        def __init__(self, data: dict) -> None:
            self.data = data

        def __contains__(self, key) -> bool:
            seen.add(key)
            return key in self.data

        def __iter__(self):
            return iter(self.data)

    class Watched(dict):
        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key) -> bool:
            seen.add(key)
            return super().__contains__(key)

        def keys(self):
            return Keys(dict(self))

    try:
        DeepSpeedConfig(Watched(config), mpu=mpu)
    except Exception:  # the real validation comes later; this run only records which keys are read
        pass
    return seen


def _lookup(config: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def merge_deepspeed_config(built: dict, file_config: dict, cfg: TrainingConfig, data_parallel_size: int,
                           mpu=None) -> dict:
    """The flags' configuration with the file's keys added; raises ValueError for unknown keys and for values
    that contradict the flags."""
    source = f"--deepspeed-config {cfg.deepspeed_config}"
    if "bfloat16" in file_config:  # DeepSpeed's older spelling of the bf16 section
        file_config = {("bf16" if k == "bfloat16" else k): v for k, v in file_config.items()}
    known = known_top_level_keys({**file_config, **built}, mpu)
    unknown = sorted(set(file_config) - known)
    if unknown:
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, known, 1)) else repr(k)
                 for k in unknown]
        raise ValueError(f"{source} has keys DeepSpeed does not know: {', '.join(hints)}")
    if "scheduler" in file_config:
        raise ValueError(f"{source} has a 'scheduler' section, but the learning rate follows --lr, --min-lr, "
                         f"--lr-warmup-iters and --lr-decay-style (set every step): remove the section")
    if _lookup(file_config, ("checkpoint", "load_universal")):
        raise ValueError(f"{source} sets checkpoint.load_universal, but checkpoints of another data-parallel size "
                         f"are converted on load already (docs/DISTRIBUTED.md): remove the key")
    optimizer = file_config.get("optimizer")
    if optimizer is not None:
        kind = str(optimizer.get("type", "")).lower()
        if kind not in ("adam", "adamw") or optimizer.get("params", {}).get("adam_w_mode") is False:
            raise ValueError(f"{source}: the optimizer must be AdamW (type Adam or AdamW with decoupled weight decay), "
                             f"got {optimizer}")
        if "lr" in optimizer.get("params", {}) and optimizer["params"]["lr"] != cfg.lr:
            raise ValueError(f"{source} sets optimizer.params.lr {optimizer['params']['lr']} but --lr is {cfg.lr}: "
                             f"drop the key (the schedule sets the learning rate every step)")
    flags = {"--micro-batch-size": cfg.micro_batch_size, "--clip-grad": cfg.clip_grad,
             "--zero-stage": built["zero_optimization"]["stage"], "--bf16": cfg.bf16, "--fp16": cfg.fp16,
             "--adam-beta1/--adam-beta2": [cfg.adam_beta1, cfg.adam_beta2], "--adam-eps": cfg.adam_eps,
             "--weight-decay": cfg.weight_decay}
    for path, flag in _AGREEING_KEYS:
        value = _lookup(file_config, path)
        if value is not None and _differs(value, flags[flag]):
            raise ValueError(f"{source} sets {'.'.join(path)} = {value!r} but {flag} is {flags[flag]!r}: make them "
                             f"agree (or drop the key; the flags fill it)")
    accumulation = built["gradient_accumulation_steps"]
    if file_config.get("train_batch_size", cfg.global_batch_size) != cfg.global_batch_size:
        raise ValueError(f"{source} sets train_batch_size = {file_config['train_batch_size']} but "
                         f"--global-batch-size is {cfg.global_batch_size}: make them agree (or drop the key)")
    if file_config.get("gradient_accumulation_steps", accumulation) != accumulation:
        raise ValueError(f"{source} sets gradient_accumulation_steps = {file_config['gradient_accumulation_steps']} "
                         f"but --global-batch-size / (--micro-batch-size x data-parallel size {data_parallel_size}) "
                         f"is {accumulation}: make them agree (or drop the key)")
    merged = {key: value for key, value in file_config.items() if key not in ("train_batch_size",)}
    for key, value in built.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**value, **merged[key]}
        elif key not in merged:
            merged[key] = value
    return merged


def _differs(file_value, flag_value) -> bool:
    if isinstance(flag_value, bool) or isinstance(file_value, bool):
        return bool(file_value) != bool(flag_value)
    if isinstance(flag_value, (list, tuple)):
        return [float(v) for v in file_value] != [float(v) for v in flag_value]
    return float(file_value) != float(flag_value)


def validate_with_deepspeed(config: dict, mpu) -> None:
    """Let DeepSpeed parse the final configuration (its sections reject unknown keys and bad values) now, before
    the model is built, so a bad file fails with one clear line."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(config, mpu=mpu)
    except Exception as e:  # pydantic ValidationError, AssertionError: DeepSpeed's own words
        message = " ".join(str(e).split())
        raise ValueError(f"DeepSpeed rejects the configuration: {message[:400]}") from None


def deepspeed_config_for(cfg: TrainingConfig, zero_stage: int, file_config: dict | None, groups, device) -> dict:
    """The run's final DeepSpeed configuration (flags, then the file), checked by DeepSpeed itself; raises
    ValueError with one line for anything wrong. Collective: it joins DeepSpeed's communication layer to
    torch.distributed (DeepSpeed sizes the data-parallel world from it)."""
    import deepspeed

    from ..parallel.mpu import ModelParallelUnit

    if device.type == "cpu":
        disable_cpu_shared_memory_allreduce()
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it, even for a single process
    deepspeed.comm.init_distributed(dist_init_required=False, verbose=False)
    mpu = ModelParallelUnit(groups)
    built = build_deepspeed_config(cfg, zero_stage, groups.data_parallel_size, groups.context_parallel_size)
    config = merge_deepspeed_config(built, file_config, cfg, groups.data_parallel_size, mpu) if file_config else built
    validate_with_deepspeed(config, mpu)
    return config


def disable_cpu_shared_memory_allreduce() -> None:
    """On CPUs DeepSpeed JIT-compiles a shared-memory all-reduce (a C++ build of minutes, on first use, needing a
    compiler) that the gloo runs here do not need; mark it unavailable so DeepSpeed uses torch.distributed.
    (deepspeed.ops.__compatible_ops__ is DeepSpeed's table of buildable ops, probed once per process.)"""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
