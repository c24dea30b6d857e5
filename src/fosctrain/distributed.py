"""Data-parallel training on torch.distributed: process-group set-up and teardown, rank
information, sharding of global batches, reductions, and the `fosc train --nproc` launcher.

How a data-parallel run stays equal to a single-process one (docs/DISTRIBUTED.md):

- `batch_size` is the GLOBAL batch. Every rank holds the same run generator in the same state,
  draws the same epoch permutation and augmentation from it, and takes a contiguous slice of
  each global batch (`Dist.shard`: sizes differ by at most one row).
- The attacks' random starts are drawn for the whole global batch from that generator and
  sliced (`Dist.random_starts`, the start sampler the attacks get), so every rank consumes the
  generator exactly as one process would: the random stream, the checkpoints and therefore
  resume do not depend on the number of processes.
- The loss is rescaled so that DDP's gradient average is the gradient of the global-batch
  mean, also for uneven shards (`Dist.loss_scale`).
- Every batch's statistics are all-reduced, and its per-sample FOSC values gathered in global
  batch order (`Dist.reduce_batch`), so the run state is global and identical on every rank.
- BatchNorm normalizes with each rank's local batch statistics (as DDP does); the running
  statistics are averaged over the ranks after each step (`Dist.average_buffers`) instead of
  DDP's broadcast from rank 0, so every rank attacks and evaluates the very same model.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fosctrain.attacks.engine import Sampler, random_start
from fosctrain.errors import UserError, check_positive

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

# Statistics of one training batch that are summed over ranks (fosctrain.train.train_batch).
SUM_KEYS = (
    "loss_sum",
    "correct",
    "n",
    "train_evals",
    "attack_evals",
    "steps_sum",
    "stopped_sum",
    "skipped",
)


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def shared(error: E) -> E:
    """Mark an error that every rank raises alike: rank 0 reports it and exits with its status,
    the other ranks exit quietly (were they to fail first, the launcher would stop rank 0
    before it could say why). Only a UserError carries the mark (its declared field
    `every_rank`): any other exception is a bug, and every rank reports it."""
    if isinstance(error, UserError):
        error.every_rank = True
    return error


def is_shared(error: BaseException) -> bool:
    """Whether every rank raised `error` alike (see shared)."""
    return isinstance(error, UserError) and error.every_rank


def under_launcher() -> bool:
    """True when torchrun (or `fosc train --nproc`) started this process with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run. The default is a single process; every method
    is then a no-op that returns its input, so the training loop reads the same either way."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ sharding

    def shard(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """The rows [lo, hi) of a global batch of n rows that `rank` (default: this) takes."""
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        lo = r * base + min(r, extra)
        return lo, lo + base + int(r < extra)

    def loss_scale(self, local_n: int, global_n: int) -> float:
        """Factor on the local mean loss that makes DDP's gradient average the gradient of the
        global mean: world * local_n / global_n (exactly 1 for even shards)."""
        return self.world * local_n / global_n

    def random_starts(self, lo: int, hi: int, n: int) -> Sampler:
        """The start-point sampler for an attack on rows [lo, hi) of an n-row global batch: it
        draws the random start for all n rows and keeps its own, so the generator advances as
        in a single process and every row gets the start it would get there (the plain uniform
        sampler in a single process)."""
        if not self.enabled:
            return random_start

        def sliced(x0: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
            if x0.shape[0] != hi - lo:
                raise RuntimeError(f"random start for {x0.shape[0]} rows, shard has {hi - lo}")
            zeros = torch.zeros((n, *x0.shape[1:]), dtype=x0.dtype)
            delta = random_start(zeros, eps, norm, generator)[lo:hi]
            return x0 + delta.to(device=x0.device)

        return sliced

    # ------------------------------------------------------------------ collectives

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn on rank 0 alone; its result, or the exception it raised, reaches every rank."""
        if not self.enabled:
            return fn(*args, **kwargs)
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:  # re-raised on every rank below
                error = e
        result, error = self.broadcast((result, error))
        if error is not None:
            raise shared(error)
        return result

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64: counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_true(self, flag: bool) -> bool:
        """True when `flag` holds on every rank."""
        if not self.enabled:
            return flag
        return self.sum([float(not flag)])[0] == 0

    def reduce_batch(
        self, stats: dict[str, Any], lo: int, hi: int, n: int, stop: bool
    ) -> tuple[dict[str, Any], bool]:
        """One collective per batch: the global sums of SUM_KEYS, the per-sample FOSC values
        in global batch order (each rank fills its rows of a zero vector), and whether any rank
        was asked to stop (so that all stop at the same batch)."""
        if not self.enabled:
            return stats, stop
        fosc = stats.get("fosc")
        values = [float(stats.get(k, 0)) for k in SUM_KEYS] + [float(stop)]
        rows = torch.zeros(n if fosc is not None else 0, dtype=torch.float64)
        if fosc is not None:
            rows[lo:hi] = torch.tensor(fosc, dtype=torch.float64)
        t = torch.cat([torch.tensor(values, dtype=torch.float64), rows]).to(self.device)
        dist.all_reduce(t)
        t = t.cpu()
        k = len(SUM_KEYS)
        sums = t[:k].tolist()
        out: dict[str, Any] = {
            key: v if key == "loss_sum" else round(v) for key, v in zip(SUM_KEYS, sums, strict=True)
        }
        if fosc is not None:
            out["fosc"] = t[k + 1 :].tolist()
        return out, bool(t[k] > 0)

    def average_buffers(self, module: nn.Module) -> None:
        """Average the floating-point buffers (BatchNorm running statistics) over the ranks."""
        if not self.enabled:
            return
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        with torch.no_grad():
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    # ------------------------------------------------------------------ models

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around `model` (the module itself in a single process).

        Buffers are not broadcast at each forward: `average_buffers` keeps them equal."""
        if not self.enabled:
            return model
        # lazy: a single process (every run but --nproc N) never loads the DDP machinery
        from torch.nn.parallel import DistributedDataParallel as DDP

        options = inspect.signature(DDP.__init__).parameters
        # torch 2.13 renamed broadcast_buffers (and deprecated the old name)
        off = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, **{off: False})


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[Dist]:
    """The process group torchrun asked for (env RANK, WORLD_SIZE, LOCAL_RANK), or a single
    process. gloo on CPU, nccl on CUDA, where each rank takes cuda:LOCAL_RANK. A group that the
    caller initialized already is used as it is and left open."""
    if not under_launcher() and not (dist.is_available() and dist.is_initialized()):
        yield Dist(device=device)
        return
    if not dist.is_available():
        raise UserError("torch.distributed is not available in this PyTorch build")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)
        if created:  # no rank tears the group down while another still talks to it
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


def leave(status: int) -> NoReturn:
    """End a rank of a data-parallel run with `status` without finalizing the interpreter.

    Once DDP has wrapped a model, gloo's process group outlives destroy_process_group (its
    worker threads stay; measured on torch 2.13, not without DDP). A worker thread that drops
    the last reference to a finished collective's tensor after finalization began must take the
    GIL to free its Python object, and the process aborts ("terminate called without an active
    exception", SIGABRT) after a successful run, failing it: about one loaded run in 25 here.
    Every file of the run is written and closed by now; the streams are flushed here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


# ---------------------------------------------------------------------- the launcher


def port_free(port: int, host: str = "") -> bool:
    """Whether a TCP server could listen on `port` now (what torchrun's store will do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port no one listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str], port: int | None = None) -> int:
    """Run `python -m fosctrain ARGV` in `nproc` processes on this machine, as
    `torchrun --nproc-per-node NPROC --master-port PORT -m fosctrain ARGV` would, and return
    the exit status of the first process that failed (0 when all succeeded)."""
    check_positive("--nproc", nproc, integer=True)
    if port is None:
        port = free_port()
    elif not 0 < port < 65536:
        raise UserError(f"--master-port must be in 1..65535, got {port}")
    elif not port_free(port):
        raise UserError(
            f"port {port} on this machine is in use; pick another --master-port "
            "or leave it out for a free one"
        )
    # lazy: the launcher's modules load only when `fosc train --nproc N` launches
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    # Share the cores out instead of torchrun's blanket OMP_NUM_THREADS=1 (and its warning);
    # --threads, when given, still sets each process's torch threads.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = parse_args(
        [
            "--nproc-per-node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "--max-restarts",
            "0",
            "-m",
            "fosctrain",
            *argv,
        ]
    )
    config, cmd, cmd_args = config_from_args(args)
    # The agent logs "failed (exitcode: N)" for a worker that exits non-zero; the worker has
    # said why already (rank 0 prints one line for a bad option or run directory).
    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    quiet = _DropWorkerFailures()
    agent_log.addFilter(quiet)
    try:
        elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        signal = -failure.exitcode
        print(f"fosc: error: process {rank} was killed by signal {signal}", file=sys.stderr)
        return 128 - failure.exitcode
    except SignalException:
        return 130
    finally:
        agent_log.removeFilter(quiet)
    return 0


class _DropWorkerFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")
