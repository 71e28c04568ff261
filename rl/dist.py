"""The distributed helpers of the trainer: one process or torchrun (DDP or FSDP2), in one small place.

Every collective is a no-op in a single process, so the loop reads the same either way.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over all ranks (op: sum, min or max); returns `t`."""
        if self.distributed:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable values only)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.distributed:
            dist.destroy_process_group()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE), or stay a single process."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    if d.distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    if device.type == "cpu" and d.distributed:  # torchrun sets OMP_NUM_THREADS=1; share the cores instead
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", d.world))))
    return d


def finite_on_all_ranks(value: torch.Tensor) -> bool:
    """True when `value` is finite on every rank. Ranks must agree before skipping an update: a rank that
    skipped a backward alone would leave the others waiting forever in the gradient all-reduce."""
    ok = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def wrap_for_training(scorer: torch.nn.Module, policy, fsdp: bool, d: Dist, device: torch.device):
    """The module the training forward goes through: the scorer itself (one process), DDP around it, or the
    scorer as the FSDP2 root with every decoder layer sharded (then the rest: embeddings, norm, head)."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in policy.model.layers:
            fully_shard(layer)
        fully_shard(scorer)
        with torch.no_grad():  # FSDP must initialise through the root; generate() would reach the layers first
            scorer([[0]], [[0]])
        scorer.reshard()  # the root stays unsharded after a forward; the optimizer must see the sharded params
        return scorer
    if d.distributed:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(scorer, device_ids=[device.index] if device.type == "cuda" else None)
    return scorer


@contextlib.contextmanager
def full_params(root: torch.nn.Module, fsdp: bool):
    """generate() calls the policy directly: under FSDP gather the root's shards around it."""
    if fsdp:
        root.unshard()
    yield
    if fsdp:
        root.reshard()
