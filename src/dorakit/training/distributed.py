"""Training on several processes with PyTorch's own engines: DDP and FSDP2 (``fully_shard``).

A run is started by ``torchrun --nproc-per-node N`` or ``accelerate launch --multi_gpu
--num_processes N``; both set RANK / WORLD_SIZE / LOCAL_RANK, which is all this module reads.
Each process uses ``cuda:<LOCAL_RANK>`` with NCCL, or the CPU with gloo.

FSDP2 shards every decoder layer (the model's ``_no_split_modules``) and then the root, with bf16
parameters and fp32 gradient reduction under ``precision="bf16"``. DoRA needs the full rows of W0
for its norm ||W0 + sBA||_c: the adapter computes it inside the layer's forward, where FSDP has
all-gathered the layer's parameters (W0, A, B and m in one all-gather), so nothing is gathered a
second time. The magnitude, A and B are sharded and trained like any parameter.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import STRATEGIES
LAUNCH = ("torchrun --nproc-per-node N -m dorakit finetune ... (or accelerate launch --multi_gpu "
          "--num_processes N -m dorakit finetune ...)")


class DistributedError(ValueError):
    """A distributed setting that cannot work; the message names it and the fix."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank r of world_size processes, under ``strategy``."""

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints progress."""
        return self.rank == 0


ONE_PROCESS = Dist()
"""A run without a launcher."""
_JOINED = False  # whether setup() made the process group (and teardown() may destroy it)


def launched_world() -> int | None:
    """WORLD_SIZE when this process was started by torchrun / accelerate launch, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["WORLD_SIZE"])


def setup(strategy: str, device: str) -> tuple[Dist, torch.device]:
    """Join the process group of a distributed launch (``strategy`` ddp / fsdp) and pick this rank's
    device; with ``strategy="none"``, check that this is a single-process run.

    Raises:
        DistributedError: ddp / fsdp without a launcher, several launched processes with "none",
            a device that does not fit the launch, or fp16 / 4-bit settings the engine cannot run.
    """
    if strategy not in STRATEGIES:
        raise DistributedError(f"--strategy must be one of {STRATEGIES}, got {strategy!r}.")
    world = launched_world()
    if strategy == "none":
        if world is not None and world > 1:
            raise DistributedError(f"this process is one of {world} started by a distributed launcher, but --strategy "
                                   "is none: each would train alone and write the same files. Pass --strategy ddp or "
                                   "--strategy fsdp, or start a single process.")
        return ONE_PROCESS, single_device(device)
    if world is None:
        raise DistributedError(f"--strategy {strategy} needs a distributed launch (RANK and WORLD_SIZE are not set): "
                               f"run {LAUNCH}; for one process use --strategy none.")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device not in ("auto", "cuda", "cpu"):
        raise DistributedError(f"--device {device}: under a distributed launch each process takes cuda:<LOCAL_RANK> "
                               "(or the CPU); pass --device auto, cuda or cpu.")
    if device == "cuda" and not torch.cuda.is_available():
        raise DistributedError("--device cuda: this machine has no CUDA device; use --device cpu (gloo).")
    if use_cuda and local >= torch.cuda.device_count():
        raise DistributedError(f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; start "
                               "at most that many processes per node (--nproc-per-node).")
    here = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        global _JOINED
        _JOINED = True
        if use_cuda:
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off unless asked for (see README)
            os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
            torch.cuda.set_device(here)
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=here if use_cuda else None)
    return Dist(strategy, rank, world, local), here


def check_device(device: object, launch_checks: bool = True) -> str:
    """``device`` if it is "auto" or a torch device that this machine has (type and index), else a
    DistributedError naming it; nothing is allocated. Under a distributed launch only the spelling is
    checked here (``launch_checks``): setup() checks the device against the launch (each process takes
    cuda:<LOCAL_RANK>)."""
    if device == "auto":
        return device
    try:
        parsed = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError):
        raise DistributedError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:0.") from None
    if launch_checks and launched_world() is not None:
        return str(device)
    available = {"cpu": lambda: 1, "cuda": lambda: torch.cuda.device_count() if torch.cuda.is_available() else 0,
                 "mps": lambda: int(torch.backends.mps.is_available())}
    count = available.get(parsed.type, lambda: 0)()
    if count == 0:
        fix = "use --device cpu" if parsed.type == "cuda" else "use --device auto, cpu or cuda"
        raise DistributedError(f"--device {device}: this machine has no {parsed.type} device; {fix}.")
    if parsed.index is not None and parsed.type != "cpu" and parsed.index >= count:
        raise DistributedError(f"--device {device}: this machine has {count} {parsed.type} device(s) "
                               f"({parsed.type}:0 to {parsed.type}:{count - 1}); pick one of those.")
    return str(device)


def single_device(device: str) -> torch.device:
    """"auto" (CUDA if present, else CPU) or the named device, checked to exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(check_device(device, launch_checks=False))


def teardown(finished: bool = True) -> None:
    """Leave the process group that setup() joined; one the caller made is left to the caller.

    ``finished``: every rank got here without an error, so all of them meet at a barrier first (after an
    error there is none: the other ranks may never reach it).

    Under gloo a rank that exits right after its last collective can abort at exit (SIGABRT, "terminate
    called without an active exception"; 2 of 20 runs of tests/dist_worker.py, 1 of 40 with the barrier
    alone). gloo's worker thread frees a finished collective's tensors after wait() has returned (or, past
    a barrier, when it frees the barrier), which takes the GIL; once the interpreter is finalizing that
    thread cannot take it and the process aborts. So the GIL is released for a moment (``GLOO_DRAIN_S``)
    after the last collective: the worker thread is already at that point and needs microseconds.
    """
    global _JOINED
    if _JOINED:
        leave_process_group(finished)
    _JOINED = False


def leave_process_group(finished: bool = True) -> None:
    """Leave the default process group, whoever made it (e.g. transformers.Trainer under ``accelerate
    launch``), as teardown() does: a barrier first when every rank ``finished``, then, under gloo, the
    GIL released for GLOO_DRAIN_S so gloo's worker threads free their last tensors before the
    interpreter finalizes (see teardown). Call it at the end of a script that trains on CPU processes."""
    if not dist.is_initialized():
        return
    gloo = dist.get_backend() == "gloo"
    if finished:
        dist.barrier()
    dist.destroy_process_group()
    if gloo:
        time.sleep(GLOO_DRAIN_S)


GLOO_DRAIN_S = 0.2
"""Seconds teardown() leaves gloo's worker threads to free their last collectives' tensors."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: those whose class is in ``model._no_split_modules``
    (transformers' decoder / encoder layers), else the items of the model's ModuleLists. Innermost
    first, as fully_shard must be applied bottom-up."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = [child for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1 for child in m]
    return layers[::-1]


PARAMS_CAST = "dorakit_fsdp_casts_params"
"""Set in a model's __dict__ when FSDP's policy casts its parameters to bf16 (then no autocast)."""


def wrap(model: nn.Module, d: Dist, device: torch.device, precision: str) -> nn.Module:
    """``model`` under DDP, or sharded in place with FSDP2; unchanged for strategy "none".

    FSDP2 with ``precision="bf16"`` (gradients reduced in fp32 either way):

    - adapter training (some parameters frozen): the frozen weights are stored, sharded and gathered
      in bf16, the trainable ones (A, B, magnitudes, heads) stay fp32 and train exactly as in one
      process or under DDP: the step runs under bf16 autocast there and here alike, so the DoRA
      scale m / ||W0 + sBA|| is never computed from a bf16-rounded magnitude;
    - full fine-tuning: bf16 parameters gathered from the fp32 shards (AdamW's master weights), no
      autocast.
    """
    if d.strategy == "none":
        return model
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_precision(d.strategy, precision)
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    cast_params = precision == "bf16" and not frozen
    if precision == "bf16" and frozen:
        with torch.no_grad():
            for p in frozen:
                p.data = p.data.to(torch.bfloat16)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cast_params else None,
                                  reduce_dtype=torch.float32 if precision == "bf16" else None)
    model.__dict__[PARAMS_CAST] = cast_params
    mesh = init_device_mesh(device.type, (d.world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    _no_eval_norm_cache(model)
    return model


def _no_eval_norm_cache(model: nn.Module) -> None:
    """FSDP2 writes the optimizer's update into shards the adapters never see, so their eval-mode norm
    cache (keyed on version counters) cannot tell A or B changed: it is turned off."""
    from ..adapters.layers import AdapterLayer

    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.cache_norm = False


def check_precision(strategy: str, precision: str) -> None:
    """fp16 needs a gradient scaler over whole gradients: DDP has them, FSDP2's are sharded."""
    if strategy == "fsdp" and precision == "fp16":
        raise DistributedError("--precision fp16 with --strategy fsdp: FSDP2 here runs bf16 mixed precision (fp32 "
                               "master weights and reduction); pass --precision bf16, or use --strategy ddp for fp16.")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 shards in place: the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def autocast_needed(model: nn.Module) -> bool:
    """Whether the training loop autocasts for bf16 / fp16: not where FSDP2's policy casts the parameters."""
    return not model.__dict__.get(PARAMS_CAST, False)


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, backward reduces gradients across processes only if ``enabled`` (off for
    all but the last micro-batch of a gradient-accumulation step)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_sum(values: Sequence[float], d: Dist, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64); the values themselves for one."""
    if d.world_size == 1:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def full_trainable(model: nn.Module, d: Dist) -> Iterator[None]:
    """Collective: inside the block, rank 0's model holds the full trainable tensors (gathered from
    the fp32 shards, on the CPU) in place of its FSDP shards, so the adapter writers read it as
    they read a one-process model; the shards are put back on exit. A no-op unless sharded."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    if d.main:
        replacement: dict[int, nn.Parameter] = {}  # one new Parameter per old one: tied weights stay tied
        for name, param in list(model.named_parameters(remove_duplicate=False)):
            if param.requires_grad:
                owner_name, _, attr = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                if id(param) not in replacement:
                    replacement[id(param)] = nn.Parameter(full[name], requires_grad=True)
                swapped.append((owner, attr, param))
                owner._parameters[attr] = replacement[id(param)]
    try:
        yield
    finally:
        for owner, attr, param in swapped:
            owner._parameters[attr] = param
