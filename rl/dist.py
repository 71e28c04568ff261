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
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def process_group_backend(device: torch.device) -> str:
    """NCCL serves CUDA tensors only, while the trainer's counts and metrics are small CPU tensors and object
    collectives pickle through CPU memory: on CUDA, one group with gloo for CPU tensors and NCCL for the rest."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, fsdp: bool = False) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE), or stay a single process. FSDP2 needs a
    process group even in one process (one GPU): then a local one is made without torchrun's rendezvous."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    if d.distributed or fsdp:
        backend = process_group_backend(device)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
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


def wrap_for_training(scorer: torch.nn.Module, policy, fsdp: bool, d: Dist, device: torch.device,
                      compute_dtype: torch.dtype = torch.float32):
    """The module the training forward goes through: the scorer itself (one process), DDP around it, or the
    scorer as the FSDP2 root with every decoder layer sharded (then the rest: embeddings, norm, head). Under
    FSDP2 with a compute dtype below fp32, the fp32 parameters are gathered in that dtype and gradients are
    reduced in fp32 (the optimizer always updates the fp32 shards)."""
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype if compute_dtype != torch.float32 else None,
                                  reduce_dtype=torch.float32)
        for layer in policy.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(scorer, mp_policy=mp)
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
    """Generation and evaluation call the policy directly, many times, and ranks finish them at different
    moments (different completion lengths, micro-batch counts, shard sizes). Under FSDP every sharded forward is
    a collective that all ranks must join, so instead every module's full parameters are gathered once here and
    kept through the forwards: generation then issues no collective at all. Costs the unsharded parameters'
    memory for its duration (15 GB for a 7B model in bf16), and one all-gather per module instead of one per
    module per decoding step."""
    if not fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    modules = [m for m in root.modules() if isinstance(m, FSDPModule)]
    root.set_reshard_after_forward(False)  # recursive: no forward may free what was gathered
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.set_reshard_after_forward(m is not root, recurse=False)  # FSDP's defaults: layers free, root keeps
            m.reshard()


@contextlib.contextmanager
def gradient_sync(train_module: torch.nn.Module, enabled: bool):
    """Gradient accumulation over micro-batches: DDP and FSDP2 reduce gradients across ranks only in the
    backward of the last micro-batch (enabled=True); the earlier ones accumulate locally."""
    if hasattr(train_module, "set_requires_gradient_sync"):  # FSDP2
        train_module.set_requires_gradient_sync(enabled)
        yield
    elif hasattr(train_module, "no_sync") and not enabled:  # DDP
        with train_module.no_sync():
            yield
    else:
        yield
