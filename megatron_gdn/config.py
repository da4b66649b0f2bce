"""Configuration: the training dataclass and the Megatron-style command line that fills it.

Every TrainingConfig field is one `--flag-name` (underscores become dashes) whose help text and
default live next to the field, so the dataclass, the parser and the docs cannot drift apart.
Model-shape flags map onto GatedDeltaNetConfig (see MODEL_FLAGS); `--model-size` picks a preset that
explicit shape flags override.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from .models.configuration import MODEL_PRESETS, GatedDeltaNetConfig
from .training.cuda_graph import check_cuda_graph_config
from .training.recompute import RECOMPUTE_GRANULARITIES


def arg(default, help: str, **argparse_kwargs):
    """A dataclass field that is also a command-line flag."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **argparse_kwargs})
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainingConfig:
    # Data
    seq_length: int = arg(2048, "tokens per sample (the model sees seq_length inputs and predicts as many)")
    mock_data: bool = arg(False, "train on a deterministic synthetic token stream (smoke tests, benchmarks)")
    vocab_size: int | None = arg(None, "vocabulary size for --mock-data (a tokenizer sets it otherwise)")
    data_path: list[str] = arg([], "Megatron data prefixes, optionally weighted: 'w1 prefix1 w2 prefix2 ...'",
                               nargs="+")
    split: str = arg("969,30,1", "train,valid,test proportions of the documents of each dataset")
    tokenizer_model: str | None = arg(None, "SentencePiece model file of the data")
    make_vocab_size_divisible_by: int = arg(128, "pad the model's vocabulary to a multiple of this")
    reset_state_at_eod: bool = arg(False, "restart the recurrent state and short conv at every document end")
    # Batches and length of training
    micro_batch_size: int = arg(1, "samples per forward/backward pass")
    global_batch_size: int | None = arg(None, "samples per optimizer step (default: micro batch); the rest "
                                        "is gradient accumulation")
    train_iters: int = arg(1000, "optimizer steps to train for")
    # Optimizer and schedule
    lr: float = arg(3e-4, "peak learning rate")
    min_lr: float = arg(0.0, "learning rate at the end of decay")
    lr_decay_style: str = arg("cosine", "decay after warmup",
                              choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    lr_warmup_iters: int = arg(0, "iterations of linear warmup from 0 to --lr")
    lr_decay_iters: int | None = arg(None, "iterations over which to decay (default: --train-iters)")
    lr_wsd_decay_iters: int | None = arg(None, "WSD: length of the final decay phase (default: 10%% of decay)")
    lr_wsd_decay_style: str = arg("linear", "WSD: shape of the final decay",
                                  choices=["linear", "cosine", "exponential", "minus_sqrt"])
    weight_decay: float = arg(0.01, "AdamW weight decay (never on norms, biases, A_log, dt_bias)")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.999, "AdamW beta2")
    adam_eps: float = arg(1e-8, "AdamW epsilon")
    clip_grad: float = arg(1.0, "clip the global gradient L2 norm to this (0 disables)")
    # Precision and device
    bf16: bool = arg(False, "bf16 autocast (GPU); parameters, gradients and optimizer stay fp32")
    fp16: bool = arg(False, "fp16 autocast with dynamic loss scaling (GPU)")
    fp32_residual_connection: bool = arg(False, "keep the residual stream (the hidden states between and across "
                                         "blocks) in fp32 under --bf16/--fp16; by default it is in the autocast "
                                         "dtype, as in Megatron-LM (half the activation memory it takes; with "
                                         "--fp16, fp32 keeps large residual sums clear of fp16's 65504 limit)")
    device: str | None = arg(None, "cuda or cpu (default: cuda when available)")
    seed: int = arg(1234, "random seed of initialisation and data order")
    # Parallelism (launch N processes with torchrun; the data-parallel size is N / (TP x CP))
    tensor_model_parallel_size: int = arg(1, "split every layer's heads, MLP channels and vocabulary across "
                                          "this many GPUs (the ranks of a node)")
    sequence_parallel: bool = arg(False, "with tensor parallelism, also split the norms and residual stream "
                                  "along the sequence across the tensor-parallel ranks (less activation memory)")
    context_parallel_size: int = arg(1, "split every sequence across this many GPUs: each holds a contiguous "
                                     "slice of seq-length / CP tokens (docs/PARALLELISM.md)")
    cp_comm_type: str = arg("state_passing", "how context-parallel ranks run the delta rule: state_passing (one "
                            "all-gather of the slices' recurrent-state summaries per layer) or all_to_all "
                            "(Megatron's head-parallel exchange of the activations; needs heads / TP divisible by CP)",
                            choices=["state_passing", "all_to_all"])
    # Activation memory (megatron_gdn/training/recompute.py)
    recompute_activations: bool = arg(False, "recompute activations in backward instead of keeping them for it: "
                                      "less memory for longer sequences or larger micro batches, more compute "
                                      "(selective unless --recompute-granularity says otherwise)")
    recompute_granularity: str | None = arg(None, "what is recomputed: selective (each block's GDN mixer: its "
                                            "projections, convolutions, delta rule and gated norm; ~15%% more "
                                            "FLOPs) or full (each whole block: one hidden-state tensor per block is "
                                            "kept; ~30%% more FLOPs); giving it turns recomputation on",
                                            choices=list(RECOMPUTE_GRANULARITIES))
    # Launch overhead (megatron_gdn/training/cuda_graph.py)
    cuda_graph: bool = arg(False, "replay each micro batch's forward and backward as one CUDA graph, captured after "
                           "2 eager warm-up iterations (GPU; the built-in engine, --bf16, dense batches; not with "
                           "TP/CP > 1, ZeRO, --fp16, fp32, --reset-state-at-eod or recomputation)")
    no_gradient_accumulation_fusion: bool = arg(False, "let autograd add each micro batch's weight gradients into "
                                                "their .grad, instead of the weight-gradient product adding them "
                                                "itself (as Megatron-LM's flag; the built-in engine fuses by "
                                                "default, DeepSpeed never)")
    # Evaluation and logging
    eval_interval: int = arg(1000, "evaluate on the validation data every N iterations")
    eval_iters: int = arg(10, "validation batches per evaluation")
    log_interval: int = arg(100, "print the console line every N iterations")
    tensorboard_dir: str | None = arg(None, "write TensorBoard scalars here")
    # Checkpoints and exit
    save: str | None = arg(None, "checkpoint directory to save to")
    load: str | None = arg(None, "checkpoint directory to resume from (latest_checkpointed_iteration.txt)")
    save_interval: int | None = arg(None, "save every N iterations")
    ckpt_step: int | None = arg(None, "load this iteration instead of the latest")
    exit_on_missing_checkpoint: bool = arg(False, "fail when --load holds no checkpoint (default: start fresh)")
    no_load_optim: bool = arg(False, "do not restore the optimizer and LR schedule")
    no_load_rng: bool = arg(False, "do not restore the random number generators")
    finetune: bool = arg(False, "load weights only and start at iteration 0")
    exit_interval: int | None = arg(None, "save and exit when the iteration is a multiple of this")
    exit_duration_in_mins: float | None = arg(None, "save and exit after this many minutes")
    # Data-parallel engine and faults (docs/DISTRIBUTED.md)
    zero_stage: int | None = arg(None, "DeepSpeed ZeRO stage: 1 partitions the optimizer state, 2 also the "
                                 "gradients, 3 also the parameters, over the data-parallel ranks; 0 (or no flag) "
                                 "is the built-in data-parallel path without DeepSpeed", choices=[0, 1, 2, 3])
    deepspeed_config: str | None = arg(None, "DeepSpeed JSON config whose keys are added to the one built from "
                                       "the flags (ZeRO buckets, offload, ...); contradicting a flag is an error")
    distributed_timeout_minutes: float = arg(10.0, "a collective that waits this long for another rank (one that "
                                             "died or hangs) fails the run with an error instead of hanging")
    max_skipped_steps: int = arg(10, "stop with an error after this many consecutive iterations skipped for a "
                                 "non-finite loss or gradient (0: never; fp16 loss-scale overflows do not count)")
    inject_nan_at: list[int] = arg([], "testing aid: make rank 0's loss NaN at these iterations, to exercise the "
                                   "skipping of non-finite steps", nargs="+")

    def __post_init__(self) -> None:
        if self.global_batch_size is None:
            self.global_batch_size = self.micro_batch_size
        if self.recompute_activations and self.recompute_granularity is None:
            self.recompute_granularity = "selective"  # Megatron's meaning of --recompute-activations
        if self.bf16 and self.fp16:
            raise ValueError("choose one of --bf16 and --fp16")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"--global-batch-size ({self.global_batch_size}) must be a multiple of "
                             f"--micro-batch-size ({self.micro_batch_size})")
        if not self.mock_data and not self.data_path:
            raise ValueError("give --data-path (preprocessed .bin/.idx prefixes) or --mock-data")
        if self.mock_data and self.data_path:
            raise ValueError("--mock-data and --data-path exclude each other")
        if self.mock_data and not self.vocab_size:
            raise ValueError("--mock-data needs --vocab-size")
        if self.data_path and not self.tokenizer_model:
            raise ValueError("--data-path needs --tokenizer-model (the SentencePiece model used to preprocess it)")
        positive = ("seq_length", "micro_batch_size", "train_iters", "eval_interval", "log_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.distributed_timeout_minutes <= 0:
            raise ValueError(f"--distributed-timeout-minutes must be positive, got {self.distributed_timeout_minutes}")
        if self.max_skipped_steps < 0:
            raise ValueError(f"--max-skipped-steps must be 0 (never stop) or positive, got {self.max_skipped_steps}")
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save")
        for name in ("tensor_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel splits activations across the tensor-parallel ranks: it needs "
                             "--tensor-model-parallel-size > 1")
        if self.cuda_graph:
            check_cuda_graph_config(self)
        if self.sequence_parallel and self.seq_length % self.tensor_model_parallel_size:
            raise ValueError(f"--sequence-parallel needs --seq-length ({self.seq_length}) divisible by "
                             f"--tensor-model-parallel-size ({self.tensor_model_parallel_size})")


# Megatron flag -> GatedDeltaNetConfig field, with help text.
MODEL_FLAGS: dict[str, tuple[str, type, str]] = {
    "num_layers": ("num_hidden_layers", int, "number of blocks"),
    "hidden_size": ("hidden_size", int, "model width"),
    "num_attention_heads": ("num_heads", int, "q/k heads"),
    "head_dim": ("head_dim", int, "q/k head dimension"),
    "num_v_heads": ("num_v_heads", int, "value heads (a multiple of the q/k heads; default: as many)"),
    "expand_v": ("expand_v", float, "value head dimension = head_dim x expand_v"),
    "ffn_hidden_size": ("intermediate_size", int, "SwiGLU hidden size"),
    "conv_size": ("conv_size", int, "short convolution width"),
    "norm_epsilon": ("norm_eps", float, "RMSNorm epsilon"),
}
MODEL_SWITCHES: dict[str, tuple[str, bool, str]] = {
    "no_gate": ("use_gate", False, "no output gate (plain RMSNorm on the mixer output)"),
    "no_short_conv": ("use_short_conv", False, "no short convolutions on q, k, v"),
    "allow_neg_eigval": ("allow_neg_eigval", True, "beta in (0, 2): negative eigenvalues of the transition"),
    "untie_embeddings_and_output_weights": ("tie_word_embeddings", False, "separate lm head (the default)"),
    "tie_embeddings_and_output_weights": ("tie_word_embeddings", True, "share the embedding with the lm head"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_gdn.py", description="Pretrain a Gated DeltaNet language model (Megatron-style flags).",
        allow_abbrev=False)
    model = parser.add_argument_group("model")
    model.add_argument("--model-size", choices=sorted(MODEL_PRESETS), default=None,
                       help="a named shape: " + "; ".join(
                           f"{k}: {v['hidden_size']} hidden, {v['num_hidden_layers']} layers, "
                           f"{v['num_heads']} heads x {v['head_dim']}" for k, v in MODEL_PRESETS.items()))
    for flag, (_, typ, help_text) in MODEL_FLAGS.items():
        model.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, default=None, help=help_text)
    for flag, (_, _, help_text) in MODEL_SWITCHES.items():
        model.add_argument("--" + flag.replace("_", "-"), dest=flag, action="store_true", help=help_text)

    training = parser.add_argument_group("training")
    for f in dataclasses.fields(TrainingConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs = dict(f.metadata)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.type == "bool":
            training.add_argument(flag, action="store_true", **kwargs)
        else:
            typ = {"int": int, "int | None": int, "float": float, "float | None": float,
                   "list[int]": int}.get(f.type, str)
            training.add_argument(flag, type=typ, default=default, **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[GatedDeltaNetConfig, TrainingConfig]:
    """Parse the command line into (model config without vocabulary size, training config).

    The model's vocab_size is set by the caller once the tokenizer (or --vocab-size) is known.
    Raises ValueError with a one-line explanation for inconsistent flags.
    """
    namespace = vars(build_parser().parse_args(argv))
    training = TrainingConfig(**{f.name: namespace[f.name] for f in dataclasses.fields(TrainingConfig)})
    model_values = dict(MODEL_PRESETS[namespace["model_size"]]) if namespace["model_size"] else {}
    for flag, (name, _, _) in MODEL_FLAGS.items():
        if namespace[flag] is not None:
            model_values[name] = namespace[flag]
    for flag, (name, value, _) in MODEL_SWITCHES.items():
        if namespace[flag]:
            model_values[name] = value
    model_values["max_position_embeddings"] = training.seq_length
    return GatedDeltaNetConfig(vocab_size=training.vocab_size or 1, **model_values), training
