"""train.backend=horovod launched on Spark: the same training function on num_proc tasks through
horovod.spark.run (Gloo controller; Gloo operations on CPU, NCCL on GPU builds); its backend,
gradients averaged by hvd.DistributedOptimizer, is dl.distributed.Horovod.

Horovod 0.28.1 does not build against torch 2.14 as published: deploy/horovod/ carries the
patch and `make horovod` builds the wheel (see deploy/horovod/README.md).
"""

from __future__ import annotations


def spark_run(fn, spec, num_proc: int):
    """fn(spec) on num_proc Spark tasks through horovod.spark.run; rank 0's result. On GPU
    executors each task sees the GPUs Spark gave it (spark.task.resource.gpu.amount)."""
    import horovod.spark

    results = horovod.spark.run(fn, args=(spec,), num_proc=num_proc, use_gloo=True, verbose=1)
    return results[0]
