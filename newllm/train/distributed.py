"""Multi-process training under torchrun: DDP or FSDP2, decisions taken across ranks, and distributed
checkpoints (torch.distributed.checkpoint, DCP).

    torchrun --nproc_per_node 4 -m newllm train --config configs/X.yaml

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init()` joins that process group: gloo when the device is the CPU, nccl on CUDA (rank r
on cuda:LOCAL_RANK). Without those variables, or with WORLD_SIZE 1, nothing here runs and training is
the ordinary single process. What the ranks share (docs/distributed.md):

* data: a micro-batch is the `batch_size` windows one process would read for the same config; rank r
  takes its rows [r b, (r + 1) b), b = batch_size / world_size (the samplers' `rank`, `world_size`).
  So N processes read what 1 process reads, in the same seeded order, and the data position
  (epoch, index) is one value for all ranks;
* gradients (`wrap`): `distributed: ddp` (DistributedDataParallel: every rank holds the model,
  gradients are averaged) or `fsdp` (FSDP2 `fully_shard` on each layer and on the model: parameters,
  gradients and AdamW moments are sharded). Gradient accumulation syncs at the last micro-batch only
  (`grad_sync`: DDP `no_sync`, FSDP `set_requires_gradient_sync`);
* decisions: the step's loss is averaged across ranks before the non-finite check (a NaN on one rank
  makes every rank skip or stop), the gradient norm is global, and the time budget counts the slowest
  rank's step time (`World.mean`, `World.max`): every rank stops at the same step, none waits in a
  collective that another has left;
* files: rank 0 writes metrics, config, the final model, results and a checkpoint's global state;
  every rank writes its share of the DCP checkpoint and its own rank file (RNG, carried states).

Checkpoint folder of a distributed run (`save_checkpoint`; the single-process folder is
newllm/train/checkpoint.py's, unchanged)::

    step-0000500/model.safetensors, newllm.json   the full weights (rank 0): still a loadable model
    step-0000500/trainer.pt                       global state; "distributed": {world_size, kind}
    step-0000500/rank-00000.pt ...                each rank's RNG states (and carried states)
    step-0000500/dcp/                             model + AdamW state (DCP: .metadata + *.distcp)
    step-0000500/checksums.json                   sha256 of every file above

It is written under a temporary name by all ranks and renamed into place by rank 0 once every rank
has finished. Resuming needs the same number of processes (the rank files); a `ddp` checkpoint
resumes under `fsdp` (DCP reshards; tests/train/test_distributed.py). DCP keeps its `.metadata` as a pickle: it is read with an
unpickler that accepts only DCP's own metadata classes (`safe_reader`), so a foreign
checkpoint cannot run code; the tensors and the other values are read with `weights_only`.
"""
from __future__ import annotations

import functools
import io
import os
import pickle
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from newllm.errors import NewLLMError
from newllm.train import checkpoint as ckpt

T = TypeVar("T")
DCP_DIR = "dcp"
RANK_FORMAT = "newllm-rank-state"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; the single process is `World()` (every method a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The average of `t` over the ranks (the same value on every rank)."""
        if not self.distributed:
            return t
        t = t.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(t)
        return t / self.world_size

    def max(self, x: float) -> float:
        """The largest `x` of all ranks."""
        if not self.distributed:
            return x
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def broadcast_int(self, x: int) -> int:
        """Rank 0's `x` on every rank."""
        if not self.distributed:
            return x
        t = torch.tensor([int(x)], dtype=torch.int64, device=self.device)
        dist.broadcast(t, 0)
        return int(t)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def agree(self, fn: Callable[[], T], main_only: bool = False) -> T | None:
        """`fn()` on every rank (`main_only`: on rank 0 alone; the others get None). If it fails with a
        NewLLMError or OSError on any rank, every rank raises: that rank its own error, the others a
        one-line NewLLMError naming it, so no rank goes on into a collective the failed one left."""
        error, result = None, None
        if not main_only or self.is_main:
            try:
                result = fn()
            except (NewLLMError, OSError) as e:
                error = e
        failed = int(self.max(self.rank if error is not None else -1))
        if error is not None:
            raise error
        if failed >= 0:
            raise NewLLMError(f"rank {failed} stopped the run (its error, printed by that rank, names the cause)")
        return result

    def main_first(self, fn: Callable[[], T]) -> T:
        """`fn()` on rank 0, then on the others (rank 0 fills a cache the others then read)."""
        result = self.agree(fn, main_only=True)
        return result if self.is_main else fn()


# ---------------------------------------------------------------------- the process group
def launched() -> tuple[int, int, int] | None:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from torchrun's environment; None when not launched with WORLD_SIZE > 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = os.environ.get(key, os.environ["RANK"] if key == "LOCAL_RANK" else "")
        try:
            values[key] = int(raw)
        except ValueError:
            raise NewLLMError(f"environment {key}={raw!r}: not an integer (set by torchrun)") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise NewLLMError(f"environment RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}: need 0 <= RANK < "
                          "WORLD_SIZE and LOCAL_RANK >= 0 (set by torchrun)")
    return (rank, world, local) if world > 1 else None


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of the rank with `local_rank` for config `device: name`: cuda:LOCAL_RANK or the CPU."""
    if name == "cpu":
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if not torch.cuda.is_available():
            if name == "auto":
                return torch.device("cpu")
            raise NewLLMError("device 'cuda': CUDA is not available on this machine (use device=cpu or auto)")
        if local_rank >= torch.cuda.device_count():
            raise NewLLMError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} CUDA devices; "
                              "start at most that many processes per node (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    raise NewLLMError(f"device {name!r}: under torchrun every rank uses cuda:LOCAL_RANK or the CPU; set device: "
                      "auto, cuda or cpu")


def init(device_name: str) -> tuple[World, bool]:
    """Join torchrun's process group when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA).
    Returns (World, whether this call created the group: then `shutdown()` ends it)."""
    if dist.is_available() and dist.is_initialized():
        return current(), False
    env = launched()
    if env is None:
        return World(), False
    rank, world, local = env
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise NewLLMError(f"RANK and WORLD_SIZE are set but not {' / '.join(missing)}: start the run with torchrun")
    device = rank_device(device_name, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://", rank=rank,
                            world_size=world, device_id=device if device.type == "cuda" else None)
    return World(rank, world, local, device), True


def current() -> World:
    """The World of an initialised process group (World() when there is none or it has one rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
    return World(rank, dist.get_world_size(), local, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------- the model across ranks
def wrap(model: torch.nn.Module, cfg, world: World) -> torch.nn.Module:
    """What a training step calls: `model` itself (one process), DDP around it, or `model` sharded in
    place by FSDP2 (`fully_shard` on each layer, then on the model). Every rank starts from rank 0's
    weights (DDP broadcasts them; for FSDP they are broadcast before sharding)."""
    if not world.distributed:
        return model
    if cfg.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: whether a parameter takes part depends on the data (a memory layer's routing
        # scale is unused while a window holds one segment); without it DDP fails waiting for that
        # gradient (it stops at the next step). It costs one graph traversal per step, and DDP prints a one-time
        # note when every parameter was used.
        return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                                       find_unused_parameters=True)
    if cfg.amp == "fp16":
        raise NewLLMError("train: distributed fsdp with amp fp16 is not supported (the GradScaler's overflow check "
                          "would see only each rank's shard); use amp bf16 or none")
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns at every forward of a layer whose output is a view (an in-place op on it would skip the
    # all-gather); the model shell never modifies a layer's output in place, and tests/train/test_distributed.py
    # checks that FSDP trains as DDP does
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p, 0)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def grad_sync(net: torch.nn.Module, world: World, sync: bool):
    """Context for one micro-batch's forward and backward: gradients are reduced across ranks only when
    `sync` (the last micro-batch of a step)."""
    if not world.distributed:
        return nullcontext()
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(net, DistributedDataParallel):
        return nullcontext() if sync else net.no_sync()
    net.set_requires_gradient_sync(sync)
    return nullcontext()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for `t`: a sharded DTensor (FSDP) is gathered (a collective: call on every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(net: torch.nn.Module, world: World) -> dict[str, torch.Tensor] | None:
    """The whole model's weights, on the CPU, on rank 0 (None elsewhere). A collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if world.is_main else None


# ---------------------------------------------------------------------- checkpoints (DCP)
def save_checkpoint(ckpt_root: Path, step: int, world: World, net, model, optimizer, kind: str,
                    state: dict[str, Any], local_state: dict[str, Any], keep: int) -> Path:
    """Write `ckpt_root/step-N` from every rank (module doc), atomically, and point `latest` at it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from newllm.checkpoints.native import save_model

    name = f"step-{step:07d}"
    final = ckpt_root / name

    def prepare() -> int:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(ckpt_root)
        if final.exists():
            return -1
        (ckpt_root / f".tmp-{name}-{os.getpid()}" / DCP_DIR).mkdir(parents=True)
        return os.getpid()

    pid = world.agree(prepare, main_only=True)
    pid = world.broadcast_int(pid if world.is_main else 0)
    if pid >= 0:  # the folder's name carries rank 0's pid, so a later save can tell a killed run's leftovers
        tmp = ckpt_root / f".tmp-{name}-{pid}"
        try:
            model_sd, optim_sd = get_state_dict(net, optimizer)
            dcp.save({"model": model_sd, "optimizer": optim_sd}, storage_writer=FileSystemWriter(tmp / DCP_DIR))
            weights = full_state_dict(net, world)
            world.agree(lambda: torch.save({"format": RANK_FORMAT, "rank": world.rank, "world_size": world.world_size,
                                            **local_state}, tmp / rank_file(world.rank)))

            def complete() -> None:
                save_model(model, tmp, metadata={"step": step, "tokens": state.get("tokens")}, state_dict=weights)
                torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, **state,
                            "distributed": {"world_size": world.world_size, "kind": kind}}, tmp / ckpt.STATE_FILE)
                ckpt.write_checksums(tmp, sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()))
                os.replace(tmp, final)

            world.agree(complete, main_only=True)
        finally:
            if world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
    world.agree(lambda: ckpt.point_latest(ckpt_root, name, keep), main_only=True)
    return final


def load_checkpoint(folder: Path, state: dict[str, Any], world: World, net, optimizer) -> dict[str, Any]:
    """Restore the model and AdamW state of a distributed checkpoint `folder` (whose trainer.pt, already
    read and checked, is `state`) on every rank; returns this rank's rank-file state (RNG, ...)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    where = folder / ckpt.STATE_FILE
    info = state.get("distributed")
    if not isinstance(info, dict):
        raise NewLLMError(f"{where}: written by a single process; resume it without torchrun (its weights load "
                          "anywhere: the checkpoint folder is a model folder)")
    if info.get("world_size") != world.world_size:
        raise NewLLMError(f"{where}: written by {info.get('world_size')} processes, this run has {world.world_size}; "
                          f"resume with {info.get('world_size')} processes in all (torchrun --nproc_per_node)")
    mine = folder / rank_file(world.rank)

    def check() -> dict[str, Any]:
        sums = ckpt.read_checksums(folder, ckpt.STATE_FILE)
        shards = sorted(f for f in sums if f.startswith(DCP_DIR + "/"))
        if f"{DCP_DIR}/.metadata" not in shards:
            raise NewLLMError(f"{folder / DCP_DIR}: no .metadata in the checkpoint's {ckpt.CHECKSUMS}")
        for f in [mine.name, f"{DCP_DIR}/.metadata"] + shards[world.rank::world.world_size]:
            ckpt.verify_checksums(folder, f)
        read_dcp_metadata(folder / DCP_DIR / ".metadata")
        try:
            local = torch.load(mine, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle / zip errors come in many types
            raise NewLLMError(f"{mine}: not a readable rank state ({_first_line(e)})") from None
        if not isinstance(local, dict) or local.get("format") != RANK_FORMAT or local.get("rank") != world.rank:
            raise NewLLMError(f"{mine}: not the rank state of rank {world.rank}")
        return local

    local = world.agree(check)
    model_sd, optim_sd = get_state_dict(net, optimizer)
    try:
        dcp.load({"model": model_sd, "optimizer": optim_sd}, storage_reader=safe_reader(folder / DCP_DIR))
    except Exception as e:  # DCP wraps every rank's failure in one CheckpointException
        raise NewLLMError(f"{folder / DCP_DIR}: cannot restore the model and optimizer ({_first_line(e)})") from None
    set_state_dict(net, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return local


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


#: the classes a DCP .metadata pickle may name (torch 2.x): metadata records, sizes, dtypes, layouts
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds")


def read_dcp_metadata(path: Path):
    """A DCP `.metadata` file read with an unpickler that builds only DCP's metadata classes."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except FileNotFoundError:
        raise NewLLMError(f"{path}: missing") from None
    except Exception as e:  # truncated, garbage, or a foreign class: refused before anything runs
        raise NewLLMError(f"{path}: not a torch.distributed.checkpoint metadata file ({_first_line(e)})") from None
    if not isinstance(metadata, Metadata):
        raise NewLLMError(f"{path}: not a torch.distributed.checkpoint metadata file (holds {type(metadata).__name__})")
    return metadata


@functools.cache
def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's FileSystemReader with `read_metadata` through `read_dcp_metadata` (no arbitrary pickle)."""

        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            metadata = read_dcp_metadata(Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def safe_reader(path):
    """A DCP storage reader for `path` that reads `.metadata` with `read_dcp_metadata` (the class is
    built on first use: torch.distributed.checkpoint is imported only by a distributed run)."""
    return _safe_reader_class()(path)
