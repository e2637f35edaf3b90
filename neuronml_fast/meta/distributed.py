"""Meta-training across processes and machines on torch.distributed (gloo on CPUs, NCCL on GPUs).

``torchrun --nproc_per_node=N -m neuronml_fast.meta train ...`` starts N copies of the CLI; each
finds its place in the job in the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins the process group with a bounded
timeout. A meta-batch of ``B`` tasks is split into ``B / N`` consecutive tasks per rank.

* Tasks: task ``i`` of meta-iteration ``k`` is drawn from its own seed, a hash of (seed, stream,
  k, i) (`task_seed`); rank ``r`` draws tasks ``r*B/N .. (r+1)*B/N - 1``. Any world size therefore
  trains on exactly the tasks one process trains on, and a checkpoint needs no sampler state to
  resume at another world size.
* Meta-gradients: each rank's loss is the mean over its own tasks, and `World.average_gradients`
  averages the gradients with one all-reduce of one flat buffer, so the result is the mean over
  all B tasks, as in one process. An explicit all-reduce rather than DistributedDataParallel: the
  learners call their model functionally (``model.functional(params, ...)`` on expanded or
  adapted parameters, never ``module.forward``), the reference learner runs one backward per task
  and NeuronML takes an extra ``autograd.grad`` for its importances, and second-order MAML
  differentiates through ``autograd.grad(create_graph=True)``; DDP's forward hooks and per-backward
  bucket reducer fit none of these, while one all-reduce after ``meta_backward`` fits all of them.
* NeuronML's structure terms couple the tasks of a batch. `World.gather_tasks` gathers every
  rank's soft masks and importances with an autograd-aware all-gather, so every rank computes
  the terms on the whole batch, as one process does. Its backward sums the incoming gradients of
  all ranks (a reduce-scatter): with every rank holding the same regularizer ``R``, rank ``r``'s
  masks receive ``N * dR/dp_r``, and averaging over the ranks leaves exactly ``dR/dp``.
* Faults: every collective runs under the process group's timeout, and a failure (a dead peer, a
  collective past the timeout) is raised as `DistributedError` naming the rank and the
  collective; the process exits non-zero and torchrun ends the others.
"""

import hashlib
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
# The autograd-aware all-gather that torch.distributed.nn.functional.all_gather's deprecation
# notice points to; its backward is the summing reduce-scatter the gradient scaling above relies on.
import torch.distributed._functional_collectives as functional_collectives

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A collective failed: another rank died, or stalled past the timeout."""


def task_seed(seed, stream, iteration, index):
    """The seed of task ``index`` of meta-iteration (or evaluation round) ``iteration`` of ``stream``."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{iteration}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch.Generator seeds are below 2**63


def shard(count, size, rank):
    """Rank ``rank``'s consecutive share of ``count`` items: ``range``; the last shards may be shorter."""
    per_rank = -(-count // size)
    return range(min(rank * per_rank, count), min((rank + 1) * per_rank, count))


def environment_rank():
    """(rank, world size) torchrun set for this process; (0, 1) outside torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    missing = [name for name in ENVIRONMENT if name not in os.environ]
    if missing:
        raise DistributedError(f"environment: expected torchrun's {', '.join(ENVIRONMENT)}, got WORLD_SIZE without "
                               f"{', '.join(missing)}")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


class World:
    """This process's place in the job, and the collectives the meta-learner needs.

    ``World()`` is one process without a process group: every collective is the identity.
    """

    def __init__(self, rank=0, size=1, backend=None, timeout_s=None, local_rank=0):
        self.rank, self.size, self.backend = rank, size, backend
        self.timeout_s, self.local_rank = timeout_s, local_rank

    @classmethod
    def from_environment(cls, device="cpu", timeout_s=DEFAULT_TIMEOUT_S):
        """Join the process group torchrun describes (gloo for CPU tensors, NCCL for CUDA).

        ``World()`` outside torchrun.
        """
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a number of seconds > 0, got {timeout_s!r}")
        rank, size = environment_rank()
        if "WORLD_SIZE" not in os.environ:
            return cls()
        local_rank = int(os.environ["LOCAL_RANK"])
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
        return cls(rank, size, backend, timeout_s, local_rank)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def joined(self):
        """True when this process is in a process group (torchrun), also one of world size 1."""
        return self.backend is not None

    def _device(self):
        """Where this backend's collectives take their tensors: NCCL needs them on the rank's GPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def describe(self):
        return {"world_size": self.size, "dist_backend": self.backend}

    def _failed(self, collective, error):
        return DistributedError(
            f"rank {self.rank} of {self.size} ({self.backend}, host {socket.gethostname()}): {collective} failed "
            f"(a rank that died, or stalled past the {self.timeout_s:g} s timeout, fails collectives this way): "
            f"{error}")

    def run(self, collective, function, *args):
        """``function(*args)``, with a failure of the collective raised as `DistributedError`.

        gloo and NCCL raise a peer's fault as a plain RuntimeError, so every RuntimeError of
        ``function`` is reported as the collective's, with the original message.
        """
        if not self.joined:
            return function(*args)
        try:
            return function(*args)
        except DistributedError:
            raise
        except (RuntimeError, ConnectionError) as error:  # gloo and NCCL report peers' faults as these
            raise self._failed(collective, error) from error

    # ---- collectives --------------------------------------------------------------------------

    def barrier(self, what="barrier"):
        if self.joined:
            # gloo's barrier is an all-reduce under the process group's timeout (monitored_barrier
            # would also name the missing rank, but only rank 0 learns it).
            self.run(what, dist.barrier)

    def gather_tasks(self, tensors):
        """Per-task tensors ``[T_local, ...]`` of this rank -> ``[T_local * size, ...]`` of the whole batch.

        Autograd-aware: gradients flow back to every rank's own tasks (summed over the ranks). One
        all-gather for the whole list.
        """
        if not self.joined:
            return list(tensors)
        tasks = tensors[0].shape[0]
        flat = torch.cat([t.reshape(tasks, -1) for t in tensors], 1)
        gathered = self.run("all-gather of the tasks' structure", _all_gather, flat)
        out, start = [], 0
        for t in tensors:
            width = t[0].numel()
            out.append(gathered[:, start:start + width].reshape(tasks * self.size, *t.shape[1:]))
            start += width
        return out

    def average_gradients(self, parameters, stats, what="all-reduce of the meta-gradient"):
        """Average ``.grad`` of ``parameters`` and the numbers ``stats`` ({name: float}) over the ranks.

        One all-reduce of one flat buffer. A parameter without a gradient on every rank keeps
        none; one that has a gradient on some ranks only is an error.
        """
        if not self.joined:
            return dict(stats)
        parameters = list(parameters)
        reference = parameters[0]
        parts = [p.grad.reshape(-1).to(reference.dtype) if p.grad is not None else reference.new_zeros(p.numel())
                 for p in parameters]
        present = reference.new_tensor([float(p.grad is not None) for p in parameters])
        values = reference.new_tensor([float(v) for v in stats.values()])
        flat = torch.cat(parts + [present, values])
        self.run(what, dist.all_reduce, flat)
        flat /= self.size
        present = flat[len(flat) - len(stats) - len(parameters):len(flat) - len(stats)]
        offset = 0
        for index, p in enumerate(parameters):
            share, mean = float(present[index]), flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
            if share == 0:
                continue
            if share != 1:
                raise DistributedError(f"parameters: expected a gradient of parameter {index} {tuple(p.shape)} on "
                                       f"every rank or on none, got one on {share * self.size:g} of {self.size} ranks")
            if p.grad is None:
                p.grad = mean.clone()
            else:
                p.grad.copy_(mean)
        return dict(zip(stats, (float(v) for v in flat[len(flat) - len(stats):])))

    def any(self, flag, what="all-reduce of a stop flag"):
        """True on every rank when ``flag`` is true on any."""
        if not self.joined:
            return bool(flag)
        value = torch.tensor([float(bool(flag))], device=self._device())
        self.run(what, dist.all_reduce, value, dist.ReduceOp.MAX)
        return bool(value.item())

    def gather_shards(self, rows, count, what="all-gather of the evaluation scores"):
        """Rows ``[n_r, k]`` (float64) of every rank's `shard` of ``count`` tasks -> ``[count, k]``, in task order."""
        if not self.joined:
            return rows
        per_rank = -(-count // self.size)
        padded = torch.full((per_rank, rows.shape[1]), float("nan"), dtype=torch.float64, device=self._device())
        padded[:rows.shape[0]] = rows
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        self.run(what, dist.all_gather, gathered, padded)
        return torch.cat([g.cpu()[:len(shard(count, self.size, r))] for r, g in enumerate(gathered)])

    def all_objects(self, value, what="all-gather of the ranks' checks"):
        """[value of rank 0, value of rank 1, ...] on every rank (small picklable values)."""
        if not self.joined:
            return [value]
        out = [None] * self.size
        self.run(what, dist.all_gather_object, out, value)
        return out

    def broadcast(self, value, what="broadcast from rank 0"):
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.joined:
            return value
        box = [value]
        self.run(what, dist.broadcast_object_list, box, 0)
        return box[0]

    def close(self):
        if self.joined and dist.is_initialized():
            dist.destroy_process_group()


def _all_gather(tensor):
    # The functional collective returns before the data arrives; the copy waits for it here, so
    # that a failure surfaces inside `World.run`.
    return functional_collectives.all_gather_single(tensor, 0, dist.group.WORLD).clone()
