"""Horovod behind dl.distributed's interface (train.backend=horovod): the same training
function, with gradients averaged by hvd.DistributedOptimizer instead of DDP, launched on Spark
with horovod.spark.run (Gloo controller; Gloo operations on CPU, NCCL on GPU builds).

Horovod 0.28.1 does not build against torch 2.14 as published: deploy/horovod/ carries the
patch and `make horovod` builds the wheel (see deploy/horovod/README.md).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dl.distributed import Single, rank_device


class Horovod(Single):
    """hvd.init() in this process; rank and size from Horovod's launcher."""

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
        self.hvd.shutdown()


def spark_run(fn, spec, num_proc: int):
    """fn(spec) on num_proc Spark tasks through horovod.spark.run; rank 0's result. On GPU
    executors each task sees the GPUs Spark gave it (spark.task.resource.gpu.amount)."""
    import horovod.spark

    results = horovod.spark.run(fn, args=(spec,), num_proc=num_proc, use_gloo=True, verbose=1)
    return results[0]
