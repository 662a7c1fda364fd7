"""The distributed backend a training loop talks to, without knowing which one it has:

    b = backend()                       # from the environment torchrun / TorchDistributor set
    model = b.wrap(model.to(b.device))  # DistributedDataParallel, or the model itself alone
    opt = b.wrap_optimizer(opt, model)  # Horovod's DistributedOptimizer; the same opt otherwise
    with b.averaged(opt): opt.step()    # the gradients are the ranks' average inside
    b.broadcast(model)                  # every rank starts from rank 0's weights
    loss = b.mean(loss.detach())        # metrics averaged over ranks
    b.close()                           # every rank waits for the others, then shuts down

`Single` is one process with no distributed setup. `DDP` is torch.distributed from the
variables torchrun and TorchDistributor export (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT): gloo on CPU, NCCL with one GPU per process. `Horovod` is the same interface over
Horovod (hvd.DistributedOptimizer averages; launched by dl.horovod.spark_run). Torch only, no Spark: the function TorchDistributor pickles imports
this inside.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn


class Single:
    """One process: rank 0 of 1, nothing to synchronise."""

    rank, size, local_rank = 0, 1, 0
    # whether the model's parameters may be channels_last (Horovod's collectives take contiguous
    # tensors only: its parameters, and so their gradients, stay in the default format)
    channels_last_params = True

    def __init__(self, gpu: bool | None = None):
        self.device = torch.device("cuda" if _cuda(gpu) else "cpu")

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def wrap_optimizer(self, opt: torch.optim.Optimizer, model: nn.Module, accumulate: int = 1):
        """The optimizer that averages gradients over ranks (Horovod's); DDP's model does it."""
        return opt

    def broadcast(self, model: nn.Module) -> None:
        pass

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def gather(self, obj) -> list:
        """Every rank's obj (picklable), in rank order, on every rank."""
        return [obj]

    def no_sync(self, model: nn.Module):
        """Context for a backward pass whose gradients are not yet averaged (accumulation)."""
        return contextlib.nullcontext()

    def averaged(self, opt: torch.optim.Optimizer):
        """Context in which the gradients are the ranks' average, for checks and the optimizer's
        step. DDP's backward returns with them averaged; Horovod averages in the background."""
        return contextlib.nullcontext()

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class DDP(Single):
    """torch.distributed, one process per rank; gloo on CPU, NCCL on GPU."""

    def __init__(self, gpu: bool | None = None, timeout_s: int = 1800):
        import torch.distributed as dist

        self.rank, self.size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = rank_device(self.local_rank, gpu)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=self.rank, world_size=self.size,
                                    timeout=timedelta(seconds=timeout_s))
        self._dist = dist

    def wrap(self, model: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def broadcast(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers to every rank (after a rank-0-only checkpoint load;
        DistributedDataParallel also does it once when it wraps)."""
        for t in list(model.parameters()) + list(model.buffers()):
            self._dist.broadcast(t.data, src=0)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        out = value.detach().clone().to(self.device, torch.float64 if self.device.type == "cpu" else torch.float32)
        self._dist.all_reduce(out)
        return (out / self.size).to(value.dtype)

    def gather(self, obj) -> list:
        out = [None] * self.size
        self._dist.all_gather_object(out, obj)
        return out

    def no_sync(self, model: nn.Module):
        return model.no_sync()

    def barrier(self) -> None:
        self._dist.barrier()

    def close(self) -> None:
        """Every rank reaches the barrier before any tears its connections down: gloo aborts a
        process (std::terminate) whose peer closes a pair it is still finishing an exchange on.
        Then the rank waits for gloo's worker threads to let go of the last collectives."""
        if self._dist.is_initialized():
            self._dist.barrier()
            self._dist.destroy_process_group()
            _wait_for_gloo_workers()


class Horovod(Single):
    """hvd.init() in this process; rank and size from Horovod's launcher."""

    channels_last_params = False

    def __init__(self, gpu: bool | None = None):
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        self.rank, self.size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        self.device = rank_device(self.local_rank, gpu)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model itself, with rank 0's weights on every rank (the optimizer averages)."""
        self.broadcast(model)
        return model

    def wrap_optimizer(self, opt: torch.optim.Optimizer, model: nn.Module, accumulate: int = 1):
        return self.hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                             backward_passes_per_step=accumulate, op=self.hvd.Average)

    @contextlib.contextmanager
    def averaged(self, opt):
        """Waits for the allreduces the backward pass started: until then they write into the
        gradients in the background, and reading them (the NaN check) races with that."""
        opt.synchronize()
        with opt.skip_synchronize():
            yield

    def broadcast(self, model: nn.Module) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(value.detach().clone(), op=self.hvd.Average)

    def gather(self, obj) -> list:
        return self.hvd.allgather_object(obj)

    def barrier(self) -> None:
        self.hvd.barrier()

    def close(self) -> None:
        """As DDP.close: every rank at the barrier, then the shutdown."""
        self.hvd.barrier()
        self.hvd.shutdown()


def gloo_worker_threads() -> dict[int, str]:
    """This process's gloo worker threads (torch names them pt_gloo_runloop): thread id -> its
    scheduler state from /proc (R runnable, S sleeping, ...); empty without /proc or without gloo."""
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return {}
    threads = {}
    for t in tasks:
        try:
            if (t / "comm").read_text().strip() == "pt_gloo_runloop":
                threads[int(t.name)] = (t / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # the thread ended between the listing and the read
            continue
    return threads


def _wait_for_gloo_workers(timeout_s: float = 5.0, idle_polls: int = 3) -> None:
    """Returns once gloo's worker threads have slept through `idle_polls` polls 10 ms apart, the
    GIL free between them, or after timeout_s; at once where there are none (NCCL, not Linux).

    A worker thread lets go of a collective's work only after the rank has moved on, and the work
    holds the tensors Python handed it: freeing one whose Python object is gone takes the GIL. When
    that thread gets the CPU only once the interpreter is finalizing (a loaded machine), CPython
    3.11 and 3.12 end it with pthread_exit inside a C++ destructor, and std::terminate kills a rank
    whose work is done (SIGABRT, "terminate called without an active exception"; gdb on the core:
    ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~AsyncAllreduceWork ->
    TensorImpl::decref_pyobject -> take_gil -> PyThread_exit_thread). destroy_process_group leaves
    these threads running and torch has no call that joins them, so the rank sleeps until they are
    idle: a runnable thread shows R in /proc, and one waiting for the GIL gets it while we sleep."""
    deadline, idle = time.monotonic() + timeout_s, 0
    while idle < idle_polls and time.monotonic() < deadline:
        states = gloo_worker_threads().values()
        if not states:
            return
        idle = idle + 1 if all(s == "S" for s in states) else 0
        time.sleep(0.01)


def _cuda(gpu: bool | None) -> bool:
    """GPU when asked (and present), the CPU when not; None: the GPU when there is one."""
    return torch.cuda.is_available() and gpu is not False


def rank_device(local_rank: int, gpu: bool | None) -> torch.device:
    """One GPU per process (cuda:<local_rank>, made current), or the CPU."""
    if not _cuda(gpu):
        return torch.device("cpu")
    device = torch.device(f"cuda:{local_rank}")
    torch.cuda.set_device(device)
    return device


def backend(kind: str = "ddp", gpu: bool | None = None) -> Single:
    """kind ddp: DDP when the launcher says there are several ranks (WORLD_SIZE > 1), else
    Single; horovod: the Horovod backend (dl.horovod), whatever the size. gpu=False keeps a
    GPU machine's processes on the CPU."""
    if kind == "horovod":
        return Horovod(gpu)
    return DDP(gpu) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else Single(gpu)
