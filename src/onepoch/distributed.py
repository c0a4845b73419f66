"""Data-parallel training with PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel``.

A process started by ``torchrun`` (or ``onepoch train --nproc N``) finds ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` in its environment; :func:`start` joins the process group (NCCL on GPUs, gloo on
CPUs). Without them everything here is the identity of one process.

How the losses stay those of the global batch: each method gathers its embeddings from every rank
with :func:`gather_batch` (differentiable) and computes the single-process loss of the whole batch,
the same value on every rank. In backward the gather sums the N ranks' identical gradients into
each rank's own rows (N times the single-process gradient), and DDP's all-reduce divides by N: the
update is exactly the single-process one. BatchNorm statistics over the global batch come from
:func:`convert_sync_batchnorm` (``torch.nn.SyncBatchNorm`` on CUDA; on CPU, where PyTorch's does not
run, :class:`GlobalBatchNorm`, which gathers the per-rank sums the same way).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from onepoch.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0, the one process that writes files."""
        return self.rank == 0


def launched_world() -> World:
    """The World that torchrun's environment variables describe (one process without them)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them)") from None
    return World(rank, size, local)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def start(world: World, backend: str, device_type: str) -> None:
    """Join the process group (no-op for one process or when already joined).

    ``backend``: ``auto`` (NCCL for CUDA devices, gloo for CPUs), ``nccl`` or ``gloo``."""
    if world.size == 1 or (dist.is_available() and dist.is_initialized()):
        return
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("train.backend nccl needs CUDA devices, and none is available; use gloo (CPU)")
    if backend == "nccl" and device_type != "cuda":
        raise ConfigError("train.backend nccl needs train.device cuda (or auto on a GPU machine)")
    # torchrun's restarted workers may meet the store of the failed attempt (stale peer addresses):
    # each attempt gets keys of its own
    store, rank, size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"onepoch/attempt_{attempt}", store), rank=rank,
                            world_size=size)


def stop(*, wait: bool = True) -> None:
    """Leave the process group, if one was joined: with ``wait``, after a barrier (no rank still sends
    or receives), then ``destroy_process_group``, while the interpreter is whole (``onepoch train`` does;
    ``wait=False`` on an error, when another rank may be gone). See :func:`exit_process` for the exit."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def broadcast_object(value, src: int = 0):
    """``value`` of rank ``src`` on every rank (itself for one process)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(value) -> list:
    """[the value of rank 0, of rank 1, ...] on every rank ([value] for one process)."""
    if not active():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def gather_batch(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The tensors of all ranks concatenated along ``dim`` (rank order), differentiable: its backward
    returns to each rank the sum over ranks of the gradients of its rows. Identity for one process."""
    if not active():
        return x
    if dim != 0:
        return gather_batch(x.movedim(dim, 0).contiguous()).movedim(0, dim)
    from torch.distributed import _functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or getattr(fc, "all_gather_tensor_autograd", None)
    if gather is None:  # torch < 2.4
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()))
    return gather(x.contiguous(), 0, dist.group.WORLD)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (not differentiable: for metrics)."""
    if not active():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the batch over all ranks, for CPUs (gloo),
    where ``torch.nn.SyncBatchNorm`` does not run. Same parameters, buffers and names as the
    BatchNorm it replaces; in eval mode, or for one process, it is that BatchNorm.

    Training: mean = Σ x / n and var = Σ x² / n − mean² over every rank's batch (n in all), the
    per-rank sums gathered with :func:`gather_batch`, so gradients flow to every rank's inputs."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float32)
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        total = gather_batch(local.unsqueeze(0)).sum(0)
        c = x.shape[1]
        n = total[-1]
        mean = total[:c] / n
        var = total[c:2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                momentum = 0.1 if self.momentum is None else self.momentum
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
                self.num_batches_tracked += 1
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised over the ranks: torch's SyncBatchNorm on CUDA,
    :class:`GlobalBatchNorm` elsewhere (state dicts are unchanged)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _replace_batchnorm(module)


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device="meta")
        for name, value in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            setattr(new, name, value)  # the same tensors: an optimizer built before still holds them
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _replace_batchnorm(child))
    return module


def exit_process(code: int) -> None:
    """End a process that torchrun started (``WORLD_SIZE`` > 1) with ``os._exit(code)`` once its output
    is flushed; any other process with ``SystemExit(code)``.

    Why: after a distributed run, a rank now and then aborted at exit with ``terminate called without an
    active exception`` (SIGABRT), torchrun reporting the run failed after it had finished. The cause
    (docs/reliability.md): gloo's worker thread releases the last collective's tensors after the Python
    code has moved on; when that release frees a tensor whose Python object the tensor owns, it takes
    the GIL, and if the interpreter is finalizing by then, CPython ends the thread with
    ``pthread_exit``, whose unwinding meets a ``noexcept`` frame of ``ProcessGroupGloo::runLoop``:
    ``std::terminate``. ``os._exit`` skips the finalization, so no thread can meet it. A worker has
    nothing left to do at that point: its files are written and closed, its pools shut down."""
    if launched_world().size > 1:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed, or the reader went away
                pass
        os._exit(code)
    raise SystemExit(code)
