"""Several processes, one device each, through ``torch.distributed`` (torch only).

``torchrun --nproc-per-node N ...`` starts N processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`from_environment` joins them into one group: NCCL when each process
drives a GPU, gloo on CPUs. Several machines join the same way, through
torchrun's rendezvous (``--nnodes M --rdzv-backend c10d --rdzv-endpoint
HOST:PORT`` on every machine); nothing here depends on where the processes run.

Two ways to use them:

* **prompt sharding**: the jobs (prompt x seed) are dealt out in rounds, one
  job per process per round (:func:`rounds`), and rank 0 gathers every
  round's results (:meth:`Processes.gather`) to write them;
* **estimator split**: every process runs the same optimisation, and the q
  perturbed renders of the hybrid / zeroth-order estimator are divided among
  them (:meth:`Processes.estimator_share`, ``dno.gradients.EstimatorShare``).
  Their stopping decisions must agree, or one process would wait forever
  in a collective the others left: :class:`AgreedStopping`.

Without torchrun (``WORLD_SIZE`` unset or 1) a :class:`Processes` of one is
returned and every method is the trivial local operation.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Sequence

import torch

from .errors import DNOError, StopOptimization
from .gradients import EstimatorShare
from .optimize import StepInfo, StepRecord, _next_iteration_estimate

# How long a process waits in a collective for the others. A round of prompt sharding lasts as
# long as its slowest optimisation (minutes for SDXL at many steps), far past torch's defaults.
DEFAULT_TIMEOUT_MINUTES = 180.0


@dataclass
class Processes:
    """This process's place in the group (a group of one without torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    objects: Any = None             # process group for Python objects (gloo: they travel on the CPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def gather(self, value: Any) -> Optional[List[Any]]:
        """Every process's ``value`` in rank order on rank 0; None on the others."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist
        out = [None] * self.world if self.is_main else None
        dist.gather_object(value, out, dst=0, group=self.objects)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process."""
        if not self.distributed:
            return value
        import torch.distributed as dist
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.objects)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all processes (the same tensor on every one)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist
        # NCCL reduces tensors on this process's GPU, gloo on the CPU
        work = tensor.to(self.device) if self.backend == "nccl" else tensor.cpu()
        work = work.contiguous()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def any(self, flags: Sequence[bool]) -> List[bool]:
        """Each flag, true if it is true on any process."""
        values = torch.tensor([float(bool(f)) for f in flags])
        return [bool(v > 0) for v in self.all_reduce_sum(values)]

    def estimator_share(self) -> Optional[EstimatorShare]:
        """This process's part of the hybrid / zeroth-order renders (None alone)."""
        if not self.distributed:
            return None
        return EstimatorShare(self.rank, self.world, self.all_reduce_sum)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier(group=self.objects)

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def from_environment(device: Optional[str] = None) -> Processes:
    """Join the processes torchrun started, or a group of one without it.

    ``device``: "cpu" forces gloo on CPUs; otherwise (None or "cuda") each process takes the GPU
    of its ``LOCAL_RANK`` when CUDA is there, and the group talks NCCL.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wants_cpu = device is not None and torch.device(device).type == "cpu"
    use_cuda = torch.cuda.is_available() and not wants_cpu
    if world <= 1:
        chosen = torch.device(device) if device else torch.device("cuda" if use_cuda else "cpu")
        return Processes(device=chosen)
    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DNOError(f"process {rank} has LOCAL_RANK {local_rank} but this machine shows "
                           f"{torch.cuda.device_count()} GPUs: start at most that many processes per "
                           "machine (torchrun --nproc-per-node)")
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
        backend = "nccl"
    else:
        chosen, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(minutes=float(os.environ.get("DNO_DIST_TIMEOUT_MINUTES",
                                                              DEFAULT_TIMEOUT_MINUTES)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    objects = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    return Processes(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                     device=chosen, backend=backend, objects=objects)


def rounds(jobs: Sequence[Any], world: int) -> Iterator[List[Any]]:
    """The jobs in rounds of ``world``: process r runs job r of each round (the last may be short)."""
    for start in range(0, len(jobs), world):
        yield list(jobs[start:start + world])


class AgreedStopping:
    """The time budget and the target reward, decided the same way on every process.

    For an estimator split: the core's own checks would be taken on each process's clock and
    could disagree by a step, leaving the others in the estimator's all-reduce. As the run's
    callback (with ``time_budget`` and ``target_reward`` left out of the core's config) it applies
    the core's rules (``dno.optimize``) on every process and stops all of them as soon as any one
    would stop; ``reason`` then holds the core's wording.
    """

    def __init__(self, processes: Processes, time_budget: Optional[float], target_reward: Optional[float]):
        self.processes = processes
        self.time_budget = time_budget
        self.target_reward = target_reward
        self.records: List[StepRecord] = []
        self.reason: Optional[str] = None

    def __call__(self, info: StepInfo) -> None:
        self.records.append(StepRecord(info.step, [], None, None, info.elapsed))
        if info.step >= info.total_steps:       # the last sample: the core ends the run itself
            return
        target = self.target_reward is not None and bool((info.best_reward >= self.target_reward).all())
        late = (self.time_budget is not None
                and info.elapsed + _next_iteration_estimate(self.records) > self.time_budget)
        target, late = self.processes.any([target, late])
        if target:
            self.reason = f"target reward {self.target_reward} reached at step {info.step}"
        elif late:
            self.reason = f"time budget of {self.time_budget}s reached after {info.step} updates"
        if self.reason is not None:
            raise StopOptimization(self.reason)
