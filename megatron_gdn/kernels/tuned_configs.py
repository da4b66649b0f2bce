"""The autotuned kernels' chosen configurations: read, agreed between ranks, saved in checkpoints and restored.

Triton's autotuner times a kernel's candidate configurations at its first call for each key (the shape values and
dtypes it is keyed on) and keeps the fastest in its `cache`. Candidates whose times are close (dqkw's two best at
the `small` preset differ by 1.5%) can change places from one process to the next, and candidates can compute
other bits, each the same in every run: a row sum over 32-wide V blocks and then across them adds in another order
than over 64-wide ones. On an H200 (session 26) dqkw's (BV 32, 4 warps) gives other gate gradients than its
(64, 8 warps) at heads of 64, wy's (64, 8 warps) other beta gradients than its (64, 4 warps) at the 1.3b layer.
So a resumed run was bit-identical only when its own autotuning happened to choose as the saving run had, and the
ranks of one run could each run other configurations. Here:

- after the first iteration every rank takes rank 0's choices (agree_on_tuned_configs, before a CUDA graph is
  captured), so all ranks run the same kernels from the second iteration on; again after each evaluation, whose
  forward without gradients runs kernels of its own;
- a checkpoint holds the choices (tuned_configs) and resuming installs them (install_tuned_configs) before the
  first call, which then runs without autotuning: the saving run's kernels, and a faster start.

Choices are kept only for the GPU and Triton version that made them: another GPU has other timings and maybe
less shared memory for a configuration, and another Triton compiles other code. Under the interpreter every
kernel has one candidate (triton_utils.configs) and nothing is tuned. Nothing here imports Triton (a run on the
CPU never does): the kernel modules import it, and only those already imported can have chosen anything.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from triton.runtime.autotuner import Autotuner

PACKAGE = __name__.rpartition(".")[0]


def autotuners() -> dict[str, Autotuner]:
    """The autotuned kernels of the imported kernel modules, by "module.name" (chunk.chunk_bwd_wy_kernel). A
    module not imported yet has run no kernel, so it has chosen nothing."""
    if "triton.runtime.autotuner" not in sys.modules:
        return {}
    autotuner_class = sys.modules["triton.runtime.autotuner"].Autotuner
    found = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(PACKAGE + "."):
            continue
        short = module_name[len(PACKAGE) + 1:]
        for name, value in vars(module).items():
            if isinstance(value, autotuner_class):
                found[f"{short}.{name}"] = value
    return found


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def tuned_configs(device: torch.device, tuners: dict[str, Autotuner] | None = None) -> dict:
    """{"device", "triton", "kernels": {name: [(key, configuration as str), ...]}}: plain data, which a checkpoint
    (read with torch.load(weights_only=True)) and broadcast_object_list carry."""
    tuners = autotuners() if tuners is None else tuners
    kernels = {name: [(tuple(key), str(config)) for key, config in tuner.cache.items()]
               for name, tuner in sorted(tuners.items()) if tuner.cache}
    return {"device": device_name(device), "triton": triton_version(), "kernels": kernels}


def install_tuned_configs(saved: dict | None, device: torch.device,
                          tuners: dict[str, Autotuner] | None = None) -> str:
    """Make the kernels use the saved choices for their keys (tuned_configs' dict), importing the kernel modules
    they name. Returns a line saying what was installed, or why nothing was: choices of another GPU or Triton
    version, of a kernel or configuration this code no longer has (those are tuned again at their first call)."""
    if not saved or not saved.get("kernels"):
        return "kernel configurations: none in the checkpoint"
    here = (device_name(device), triton_version())
    if (saved["device"], saved["triton"]) != here:
        return (f"kernel configurations: saved on {saved['device']} with Triton {saved['triton']}, this run is on "
                f"{here[0]} with Triton {here[1]}: tuned again at their first call, so the kernels may differ from "
                f"the saving run's (losses after resuming are then not bit-identical to it)")
    if tuners is None:
        for name in saved["kernels"]:
            importlib.import_module(f"{PACKAGE}.{name.rpartition('.')[0]}")
        tuners = autotuners()
    installed, unknown = 0, []
    for name, entries in saved["kernels"].items():
        tuner = tuners.get(name)
        candidates = {str(config): config for config in tuner.configs} if tuner is not None else {}
        for key, config in entries:
            if config in candidates:
                tuner.cache[tuple(key)] = candidates[config]
                installed += 1
            else:
                unknown.append(f"{name} {config}")
    line = f"kernel configurations: {installed} installed from the checkpoint"
    if unknown:
        line += (f"; {len(unknown)} not among this code's candidates, tuned again ({', '.join(unknown[:3])}"
                 f"{', ...' if len(unknown) > 3 else ''})")
    return line


def agree_on_tuned_configs(device: torch.device, group: dist.ProcessGroup | None,
                           tuners: dict[str, Autotuner] | None = None) -> None:
    """Every rank of group takes rank 0's choices (a collective; group is a gloo group, the objects stay on the
    host). A key rank 0 has not tuned keeps the rank's own choice."""
    if group is None or dist.get_world_size(group) == 1:
        return
    message = [tuned_configs(device, tuners)]
    dist.broadcast_object_list(message, src=dist.get_global_rank(group, 0), group=group)
    install_tuned_configs(message[0], device, tuners)
