"""One process or many under ``torchrun``: process groups, sharding, gathering and a clean exit.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address); without them a program runs as
one process and every helper here is a no-op. Backend: NCCL when the ranks run on CUDA (rank r on
``cuda:LOCAL_RANK``), gloo on the CPU. ``engine.run`` (videos from a prompts file) and ``trainer.train`` /
``trainer.evaluate`` (through ``trainer.distributed``) use these helpers alike.

Work is sharded in *batches*: batch b holds items ``b*B .. b*B+B-1`` (B = the batch size), exactly the
batches one process would run, and batch b goes to rank ``b mod world_size``. A batch's numbers do not depend
on how many ranks there are, so a video or a metric is the same, bit for bit, on one rank or many (same
device type, dtype and thread count; batched numerics are not batch-size invariant, so sharding single
items instead would change the last bits of some results).
"""

import json
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class DistInfo:
    """This process's place: ``rank`` of ``world_size`` (0 of 1 without torchrun), ``local_rank`` on its
    machine, and the ``device`` it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def torchrun_env() -> Optional[Tuple[int, int, int]]:
    """(rank, world_size, local_rank) when launched by torchrun, else None. A ValueError if the variables
    are not whole numbers."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"]),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (set by torchrun)") from None


def env_rank() -> int:
    """This process's rank before any process group exists (0 without torchrun): who prints an error
    that every rank found alike."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def init_distributed(device: Optional[str] = None, timeout: Optional[timedelta] = None) -> DistInfo:
    """Join the process group when launched by torchrun and pick this rank's device.

    ``device``: None (CUDA when available), "cpu" or "cuda" (rank r takes ``cuda:LOCAL_RANK``; NCCL).
    ``timeout``: how long a collective waits for the slowest rank (None: torch's default).
    Raises ValueError (before joining) for an unknown device, CUDA asked for without CUDA, or a LOCAL_RANK
    with no CUDA device of its own."""
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    rank, world_size, local_rank = torchrun_env() or (0, 1, 0)
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} has no CUDA device: this machine has "
                             f"{torch.cuda.device_count()}; start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        kwargs = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group("nccl" if use_cuda else "gloo", **kwargs)
    return DistInfo(rank, world_size, local_rank, dev)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` (any picklable object) on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(items: List[T], info: DistInfo) -> List[T]:
    """Every rank's list concatenated in rank order (on every rank)."""
    if not info.enabled:
        return list(items)
    out: List[Optional[List[T]]] = [None] * info.world_size
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def first_error(error: Optional[T], info: DistInfo) -> Optional[Tuple[int, T]]:
    """Agree on failure: every rank passes its error (any picklable object; None when it has none) and every
    rank gets the same answer: ``(rank, error)`` of rank 0 when it failed, else of the lowest failing rank,
    else None. A collective: all ranks must call it, which is what keeps a rank that failed from leaving the
    others waiting in the next collective."""
    errors = gather_objects([error], info)
    return next(((rank, e) for rank, e in enumerate(errors) if e is not None), None)


@contextmanager
def owned_output(path: str, info: DistInfo, flag: str = "--out") -> Iterator[None]:
    """Hold the one-writer lock of the output ``path`` (:func:`engine.atomic.output_lock`) for the block:
    rank 0 takes it (one process, or under torchrun the one that writes), and when another process holds it
    every rank raises the same :class:`engine.atomic.OutputBusy` (one line, exit code 2), so that all stop.
    A collective under torchrun: every rank must enter it."""
    from engine.atomic import OutputBusy, output_lock

    with ExitStack() as stack:
        error = None
        if info.is_main:
            try:
                stack.enter_context(output_lock(path, flag))
            except OutputBusy as e:
                error = str(e)
        failed = first_error(error, info)
        if failed is not None:
            raise OutputBusy(failed[1])
        yield


def shard(items: Sequence[T], info: DistInfo) -> List[T]:
    """This rank's share of ``items``, round robin: items r, r + world_size, ..."""
    return list(items[info.rank::info.world_size])


def batches(n: int, batch_size: int) -> List[range]:
    """Items ``0 .. n-1`` in batches of ``batch_size`` (the last one may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def shard_batches(n: int, batch_size: int, info: DistInfo) -> List[range]:
    """This rank's batches of items ``0 .. n-1``: batch b (items ``b*batch_size ...``) goes to rank
    ``b mod world_size``, so every batch is the one a single process would run. Each rank gets
    ceil(batches / world_size) or floor(batches / world_size) of the ceil(n / batch_size) batches."""
    return shard(batches(n, batch_size), info)


def finish(info: DistInfo, code: int = 0) -> None:
    """Leave the process group (always: a rank that returns without it can leave the others waiting);
    under torchrun end the worker at once with ``os._exit``: a gloo rank sometimes aborts during
    interpreter teardown (DESIGN 8), which would fail the run."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if info.enabled:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ------------------------------------------------------------------------------------ sharded generation


@dataclass
class Job:
    """One prompt of a sharded generation: its position ``index`` in the whole list (0-based), its
    ``seed``, the ``files`` its videos go to, and the ``line`` of the prompts file it came from (1-based)."""

    index: int
    prompt: str
    seed: int
    files: List[str]
    line: Optional[int] = None


def is_complete(path: str) -> bool:
    """True when ``path`` is a finished output: files are renamed into place only once whole
    (``engine.atomic``), so a regular non-empty file is complete and anything else is not."""
    return os.path.isfile(path) and os.path.getsize(path) > 0


def describe_error(error: BaseException) -> str:
    """``"TypeName: first line of the message"``, for an index record or a log line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _record(job: Job, info: DistInfo, status: str, **extra) -> Dict[str, Any]:
    # A skipped prompt's files were written by an earlier run: its rank is not this run's.
    return dict(index=job.index, line=job.line, prompt=job.prompt, seed=job.seed, files=list(job.files),
                rank=None if status == "skipped" else info.rank, status=status, **extra)


def run_sharded(jobs: Sequence[Job], batch_size: int, info: DistInfo,
                generate: Callable[[List[Job]], Tuple[Sequence[Any], Dict[str, float]]],
                write: Callable[[str, Any], None], skip_existing: bool = False) -> List[Dict[str, Any]]:
    """Generate and write this rank's share of ``jobs``; return every job's record, in job order, on every
    rank. A collective: every rank calls it with the same jobs.

    ``jobs`` (``jobs[i].index == i``) run in the batches one process would run (:func:`shard_batches`).
    ``generate(batch)`` returns the batch's videos (one per file, in job then file order) and its seconds
    per stage; ``write(path, video)`` writes one file (atomically). With ``skip_existing``, a batch whose
    files are all complete (:func:`is_complete`, judged by rank 0) is skipped and the batches left are dealt
    round robin over the ranks; a partly written batch runs whole, so that its videos are those of an
    uninterrupted run, and only its missing files are written.

    A failure (any ``Exception``: out of memory, a write error) is recorded and the rank goes on: a failed
    generation fails the prompts of its batch, a failed write that prompt alone. KeyboardInterrupt is not
    caught. Records: ``index, line, prompt, seed, files, rank, status`` ("ok", "skipped" or "failed"), plus
    ``seconds`` (per stage: the batch's time divided by its prompts; ``write``: this prompt's own) when ok,
    and ``error`` when failed."""
    done = [bool(skip_existing) and all(is_complete(f) for f in job.files) for job in jobs] if info.is_main else None
    done = broadcast_object(done, info)  # rank 0 decides, so every rank deals the same batches
    all_batches = batches(len(jobs), batch_size)
    todo = [b for b in all_batches if not all(done[i] for i in b)]
    records: List[Dict[str, Any]] = []
    if info.is_main:
        records += [_record(jobs[i], info, "skipped") for b in all_batches if all(done[i] for i in b) for i in b]
    for batch in shard(todo, info):
        group = [jobs[i] for i in batch]
        try:
            videos, timings = generate(group)
        except Exception as e:  # noqa: BLE001 -- out of memory and the like: the other batches go on
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            error = describe_error(e)
            print(f"failed: prompts {group[0].index}-{group[-1].index} on rank {info.rank}: {error}",
                  file=sys.stderr, flush=True)
            records += [_record(job, info, "failed", error=error) for job in group]
            continue
        share = {k: round(v / len(group), 6) for k, v in timings.items() if k != "total"}
        position = 0
        for job in group:
            mine = videos[position:position + len(job.files)]
            position += len(job.files)
            if done[job.index]:
                records.append(_record(job, info, "skipped"))
                continue
            t0 = time.perf_counter()
            try:
                for path, video in zip(job.files, mine):
                    write(path, video)
            except Exception as e:  # noqa: BLE001 -- a full disk, a path taken by a folder, ...
                error = describe_error(e)
                print(f"failed: prompt {job.index} on rank {info.rank}: {error}", file=sys.stderr, flush=True)
                records.append(_record(job, info, "failed", error=error))
                continue
            seconds = dict(share, write=round(time.perf_counter() - t0, 6))
            records.append(_record(job, info, "ok", seconds=seconds))
    return sorted(gather_objects(records, info), key=lambda r: r["index"])


def write_index(path: str, records: Sequence[Dict[str, Any]], root: Optional[str] = None) -> None:
    """``records`` as JSON lines (one per prompt, in order), written atomically; ``files`` relative to
    ``root``. A skipped prompt keeps the ``rank`` and ``seconds`` of its record in the index already at
    ``path`` (the run that wrote its files), when that record is for the same prompt, seed and files."""
    from engine.atomic import atomic_path

    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    rows = []
    for r in records:
        row = dict(r, files=[os.path.relpath(f, root) for f in r["files"]])
        rows.append(row)
    previous = {}
    for old in read_index(path):
        previous[old.get("index")] = old
    for row in rows:
        old = previous.get(row["index"])
        if (row["status"] == "skipped" and old is not None and "seconds" in old
                and all(old.get(k) == row[k] for k in ("prompt", "seed", "files"))):
            row["rank"], row["seconds"] = old["rank"], old["seconds"]
    with atomic_path(path, suffix=".jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_index(path: str) -> List[Dict[str, Any]]:
    """The records of an index written by :func:`write_index`; [] when there is none or it cannot be read
    (it is rewritten whole at the end of each run)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []
