"""torch_xla (TPU, or PJRT_DEVICE=CPU for tests): the one module that imports it, and what amer does differently there.

XLA compiles each traced graph once per distinct shape and structure and replays it afterwards, so a
step must look the same every time: amer cuts one graph per micro-step (forward + backward) and one for
the optimizer (:func:`sync` at those boundaries), never reads a device value inside a step, feeds the STP
gate in as a tensor, routes the MoE through the static causal capacity dispatch, pads the last evaluation
batch, and draws STP spans from a host generator (a small input, not a host read). Checkpoints are written
from host copies, in the same safetensors format as every other device.

torch_xla is optional (``pip install -e ".[xla]"`` in its own environment: torch_xla 2.9.0 needs
torch 2.9.1). Nothing else in amer imports it.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch

from amer.errors import ConfigError

__all__ = ["available", "xla_device", "is_xla", "sync", "wait", "compile_count", "host_generator_device", "announce",
           "move", "prime_optimizer", "host_copy"]

# Python scalars 0 and 1 (and 0-dim tensors holding them) are compiled in as constants by default: a gate or
# learning rate passing through 0 would then be a different graph. Off, every scalar is an input and the graph
# stays the same. Set when amer is imported, before torch_xla starts (it reads the setting once).
os.environ.setdefault("XLA_NO_SPECIAL_SCALARS", "1")

MISSING = "--device xla needs torch_xla (pip install -e \".[xla]\" in an environment with torch==2.9.1): see README"
_ANNOUNCED = False


def _torch_xla() -> Any:
    try:
        import torch_xla
    except ImportError:
        raise ConfigError(MISSING) from None
    return torch_xla


def available() -> bool:
    """Whether torch_xla imports here."""
    try:
        _torch_xla()
    except ConfigError:
        return False
    return True


def xla_device() -> torch.device:
    """The process's XLA device (ConfigError naming the install when torch_xla is missing)."""
    return torch.device(_torch_xla().device())


def is_xla(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "xla"


def sync(device: torch.device | str | None) -> None:
    """A graph boundary on XLA: compile (once per distinct graph) and run everything traced so far. A no-op
    on every other device."""
    if is_xla(device):
        _torch_xla().sync()


def wait(device: torch.device | str | None) -> None:
    """Block until the device has finished what was launched (for timing); a no-op off XLA."""
    if is_xla(device):
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()


def compile_count() -> int:
    """Graphs compiled so far in this process (torch_xla's ``UncachedCompile`` counter)."""
    if not available():
        return 0
    import torch_xla.debug.metrics as met

    return int(met.counter_value("UncachedCompile") or 0)


def host_generator_device(device: torch.device) -> torch.device:
    """Where a run's STP generator lives: on XLA the host (its draws travel as a small input each step, so
    XLA runs draw exactly the spans an eager CPU run draws); elsewhere the device itself."""
    return torch.device("cpu") if is_xla(device) else device


def announce(model: torch.nn.Module, say: Callable[[str], None] = print) -> None:
    """Say once per process that dropless MoE layers run the static causal capacity dispatch on XLA."""
    global _ANNOUNCED
    from amer.blocks.moe import MoEMixer

    moes = [m for m in model.modules() if isinstance(m, MoEMixer) and m.router is not None]
    dropless = [m for m in moes if m.dispatch != "capacity"]
    if dropless and not _ANNOUNCED:
        _ANNOUNCED = True
        m = dropless[0]
        print(f"note: on XLA the MoE layers use the static causal capacity dispatch instead of dropless "
              f"(capacity factor {m.capacity_factor}, earned per {m.capacity_block} tokens of each document; drops are "
              "logged as moe/drop_frac)", file=sys.stderr)


def move(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model.to(device)`` keeping tied parameters tied: moving to XLA makes a new parameter per module, which
    would silently untie an LM head from its embedding (two tensors trained apart)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    model.to(device)
    for names in groups.values():
        first = model.get_parameter(names[0])
        for alias in names[1:]:
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, first)
    return model


def prime_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state (zero moments, step 0) before the first step, as its first step would: the first
    optimizer graph is then the one every later step replays instead of a graph of its own."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if optimizer.state.get(p):
                continue
            names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group.get("amsgrad") else [])
            # zeros made on the host and transferred: data, not a graph to compile
            st: dict[str, Any] = {n: torch.zeros(p.shape, dtype=p.dtype).to(p.device) for n in names}
            optimizer.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32), **st}


def host_copy(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
              model_factory: Callable[[], torch.nn.Module],
              make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> tuple[Any, Any]:
    """CPU copies of an XLA model and its optimizer state, for writing a checkpoint (safetensors reads host
    memory). Parameters keep their names, so the checkpoint is the one a CPU run writes."""
    weights = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    host = model_factory()
    host.load_state_dict(weights)
    if optimizer is None:
        return host, None
    host_opt = make_optimizer(host)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = dict(host.named_parameters())
    for p, st in optimizer.state.items():
        host_opt.state[by_name[names[id(p)]]] = {k: (v.detach().to("cpu") if torch.is_tensor(v) else v)
                                                 for k, v in st.items()}
    for group, src in zip(host_opt.param_groups, optimizer.param_groups):
        group.update({k: v for k, v in src.items() if k != "params"})
    return host, host_opt
