"""Running under torchrun: one process per GPU (or per CPU share), data-parallel training.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK. Every process runs the same command; rank 0
extracts the features first (the others wait, then read the shared cache), every rank trains on
its share of each batch (so the global batch is the single-process batch), gradients are
averaged by DistributedDataParallel, and only rank 0 writes checkpoints and the model.
Without torchrun, none of this is active and nothing imports torch.distributed.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def rank0_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` on rank 0; on the other ranks a log that prints nothing (rank 0 speaks for all)."""
    return log if is_main() else _silent


def _silent(message: str) -> None:
    pass


def active() -> bool:
    """Launched by torchrun (even as one process, so one GPU exercises the same NCCL/DDP path), or several ranks."""
    return "TORCHELASTIC_RUN_ID" in os.environ or world_size() > 1


def init() -> None:
    """Join the process group once per process: gloo for CPU tensors, NCCL for CUDA ones."""
    import torch
    import torch.distributed as dist

    if not active() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills the feature cache), then the others run it."""
    if active():
        import torch.distributed as dist

        init()
        if not is_main():
            dist.barrier()
        yield
        if is_main():
            dist.barrier()
        return
    yield


def sum_across(*values: float) -> list[float]:
    """Each value summed over all processes (identity without torchrun)."""
    if not active():
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def finish() -> None:
    """Leave the process group, if this process joined one."""
    if active():
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
