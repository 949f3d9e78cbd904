"""Data-parallel training over several processes: PyTorch DistributedDataParallel under torchrun.

``torchrun --nproc-per-node N -m fracture_ops.cli train ...`` (or ``fit``) runs the same command
in N processes; torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` and this module joins
them into one process group: ``nccl`` when training on CUDA (each process on GPU ``LOCAL_RANK``),
``gloo`` on CPU. Without those variables (a plain ``fracture-ops train``) nothing changes.

How the step divides the work (see :func:`fracture_ops.training.train.train_step`):

- every epoch each rank trains on its own disjoint part of the shuffled training set
  (:class:`~torch.utils.data.DistributedSampler` with ``drop_last``: ``len // N`` images each,
  reshuffled per epoch from ``seed + epoch``, so a resumed run replays the same epochs);
- ``batch_size`` stays the global batch (each rank takes ``batch_size // N``), so the number of
  optimiser steps per epoch and the learning-rate schedule stay those of one process (up to the
  epoch's last partial batch, which N > 1 processes drop: each rank takes ``len // N`` images);
  checkpoints hold no trace of N, so a run killed under N processes resumes under M (weights
  are saved unwrapped, without DDP's ``module.`` prefix; every rank holds the same optimiser
  state, so rank 0's is every rank's);
- gradients are averaged by DDP; training loss and throughput are gathered from every rank;
  rank 0 alone validates (on the whole validation set), logs to MLflow, writes checkpoints,
  predictions and the model, and the others follow its early-stopping decision.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fracture_ops.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def from_env(env: dict[str, str] | None = None) -> Dist:
    """The group as torchrun describes it in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    Raises:
        ConfigError: the variables are not integers, or the rank is outside the world.
    """
    env = os.environ if env is None else env
    try:
        d = Dist(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from exc
    if d.world_size < 1 or not 0 <= d.rank < d.world_size:
        raise ConfigError(f"rank {d.rank} is not within a world of {d.world_size} process(es)")
    return d


def init(device: str) -> tuple[Dist, str]:
    """Join the process group when run under torchrun; returns the group and this process's
    device (``cuda:<LOCAL_RANK>`` on GPU)."""
    d = from_env()
    if not d.enabled:
        return d, device
    import torch
    import torch.distributed as dist

    backend = "gloo"
    if device.startswith("cuda"):
        device, backend = f"cuda:{d.local_rank}", "nccl"
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # once per process (cv and fit call train several times)
        import atexit

        dist.init_process_group(backend, timeout=timedelta(minutes=30))
        atexit.register(shutdown, d)
    log.info("distributed training: rank %d of %d (%s, %s)", d.rank, d.world_size, backend, device)
    return d, device


def shutdown(d: Dist) -> None:
    """Leave the process group (after the last collective)."""
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(d: Dist) -> None:
    """Wait until every rank gets here."""
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (small picklable values)."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(d: Dist, obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def per_rank_batch(batch_size: int, d: Dist) -> int:
    """Each rank's share of the global batch (at least 1)."""
    if d.enabled and batch_size % d.world_size:
        log.warning("batch_size %d is not a multiple of the %d processes: each takes %d",
                    batch_size, d.world_size, max(1, batch_size // d.world_size))
    return max(1, batch_size // d.world_size)


def train_sampler(dataset, d: Dist, seed: int):
    """This rank's disjoint part of every epoch, or None (one process: the loader shuffles)."""
    if not d.enabled:
        return None
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=d.world_size, rank=d.rank, shuffle=True,
                              seed=seed, drop_last=True)


def wrap(model, d: Dist, device: str):
    """The model DDP trains (gradients averaged across ranks), or the model itself."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [int(device.split(":")[1])] if device.startswith("cuda:") else None
    return DistributedDataParallel(model, device_ids=ids)


# ------------------------------------------------------------------------------------ launching

NPROC_FLAG = "--nproc-per-node"
LAUNCHED = ("train", "fit")  # the subcommands that train (others take no such flag)


def add_launch_flag(parser) -> None:
    """``--nproc-per-node N`` of ``train`` and ``fit`` (read by :func:`split_launch`)."""
    parser.add_argument(NPROC_FLAG, dest="nproc_per_node", type=int, default=1, metavar="N",
                        help="processes to train with, one per GPU (default 1); more than 1 runs "
                             "this same command under torchrun (DDP: gloo on CPU, nccl on GPU)")


def split_launch(argv: list[str]) -> tuple[int, list[str]]:
    """``(N, argv without --nproc-per-node N)`` for a ``train``/``fit`` command line.

    Raises:
        ConfigError: N is not an integer from 1 to 64.
    """
    out, n, i = [], 1, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # positionals follow: never a flag
            out += argv[i:]
            break
        if arg == NPROC_FLAG or arg.startswith(NPROC_FLAG + "="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            try:
                n = int(value)
            except ValueError:
                n = 0
            if not 1 <= n <= 64:
                raise ConfigError(f"{NPROC_FLAG} must be an integer from 1 to 64, not {value!r}")
            continue
        out.append(arg)
        i += 1
    return n, out


# what the Kubeflow Trainer's torch runtime sets on each node of a multi-node TrainJob
NODE_ENV = ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def nodes_from_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """``(nodes, this node's rank)`` from the Trainer's ``PET_NNODES``/``PET_NODE_RANK``
    (``(1, 0)`` outside a multi-node job).

    Raises:
        ConfigError: a value is not an integer, or the rank is outside ``0..nodes-1``.
    """
    env = os.environ if env is None else env
    try:
        nodes, rank = int(env.get("PET_NNODES", "1") or 1), int(env.get("PET_NODE_RANK", "0") or 0)
    except ValueError:
        raise ConfigError(f"PET_NNODES={env.get('PET_NNODES')!r} and PET_NODE_RANK="
                          f"{env.get('PET_NODE_RANK')!r} must be integers") from None
    if nodes < 1 or not 0 <= rank < nodes:
        raise ConfigError(f"node rank {rank} is not within {nodes} nodes (PET_NNODES, PET_NODE_RANK)")
    return nodes, rank


def rendezvous_args(env: dict[str, str] | None = None) -> list[str]:
    """torchrun's rendezvous: ``--standalone`` on one node; across the nodes of a TrainJob, the
    static rendezvous at the master address the Trainer gives every node.

    Raises:
        ConfigError: a multi-node job without its master address or port.
    """
    env = os.environ if env is None else env
    nodes, rank = nodes_from_env(env)
    if nodes == 1:
        return ["--standalone"]
    missing = [k for k in NODE_ENV if not env.get(k)]
    if missing:
        raise ConfigError(f"a {nodes}-node job needs {', '.join(missing)} (set by the Kubeflow Trainer)")
    return [f"--nnodes={nodes}", f"--node-rank={rank}", f"--master-addr={env['PET_MASTER_ADDR']}",
            f"--master-port={env['PET_MASTER_PORT']}"]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``fracture-ops <argv>`` in ``nproc`` processes under torchrun (``--standalone`` on
    one node; on each node of a multi-node TrainJob, joined through the Trainer's master
    address) and return the exit code: 0, or the first failed rank's own code (so bad input, 3,
    still fails without retries)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    rdzv = rendezvous_args()
    log.info("launching %d processes under torchrun (%s)", nproc, " ".join(rdzv))
    try:
        torchrun([*rdzv, f"--nproc-per-node={nproc}", "-m", "fracture_ops.cli", *argv])
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    return 0
