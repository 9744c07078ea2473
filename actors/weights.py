"""Weights in transit: named tensors grouped into checksummed buckets.

A bucket is a table of (name, dtype, shape, offset) plus the tensors' bytes as uint8 numpy arrays: numpy (not
torch) so the Ray object store hands engines zero-copy views; the checksum (xxh3-64, cheap enough for every
bucket) lets the receiver detect a corrupted bucket before loading it. Buckets never split one module's parameters
(vLLM fuses q/k/v and gate/up into one kernel per module and processes a module once all its weights have arrived).

The torch_dist transport moves one flat uint8 tensor per bucket instead (`pack_flat`), on the device its process
group needs: CUDA memory for NCCL, CPU memory for gloo. On a GPU the bytes then never leave the device: the
learner packs and checksums on its GPU, the engine receives and checksums on its own (`device_checksum`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import xxhash


def checksum(arrays: Iterable[np.ndarray]) -> int:
    """xxh3-64 over the arrays' bytes, in order (the same value for the per-tensor and the flat form)."""
    digest = xxhash.xxh3_64()
    for array in arrays:
        digest.update(memoryview(array))
    return digest.intdigest()


def device_checksum(buffer: torch.Tensor, chunk_bytes: int = 16 * 2**20) -> int:
    """A position-weighted sum of a uint8 buffer's bytes, computed where the buffer lives (no copy to the host).
    Integer sums wrap identically on every device and in any order, so the learner's GPU and an engine's GPU (or
    a CPU) agree exactly. A changed byte changes the sum (its weight is never 0 mod 2^64), and so does a swap of
    two different bytes at positions of different weights."""
    total = torch.zeros((), dtype=torch.int64, device=buffer.device)
    for start in range(0, buffer.numel(), chunk_bytes):
        part = buffer[start : start + chunk_bytes].to(torch.int64)
        # weights 1..65521 (a prime): cheap, and differ between positions closer than 65521 bytes apart
        weights = (
            torch.arange(start, start + part.numel(), device=buffer.device, dtype=torch.int64) % 65521 + 1
        )
        total += (part * weights).sum()
    return int(total.item())


def buffer_checksum(buffer: torch.Tensor) -> int:
    """Checksum of a flat uint8 buffer: xxh3-64 of the bytes on the CPU (fast there, and equal to the bucket's
    per-tensor checksum), `device_checksum` on a GPU (the bytes stay there)."""
    if buffer.device.type == "cpu":
        return checksum([buffer.numpy()])
    return device_checksum(buffer)


def transport_device(backend: str) -> torch.device:
    """Where torch_dist buffers live: NCCL moves GPU memory only (the process's current GPU: Ray makes the
    actor's GPU `cuda:0`), gloo moves CPU memory."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class TensorEntry:
    name: str
    dtype: str  # torch dtype name, e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes into the bucket's flat form
    nbytes: int


@dataclass
class WeightBucket:
    """One bucket. With the object-store transport it carries its bytes (`arrays`, one uint8 array per tensor:
    Ray writes each straight into the object store, so packing costs no extra copy); with the others it is a
    descriptor and the receiver fetches the bytes itself (`path` in shared memory, or a broadcast), as one flat
    buffer laid out by the entries' offsets."""

    version: int  # policy version these weights are
    index: int  # 0.. within one sync
    entries: list[TensorEntry] = field(default_factory=list)
    arrays: list[np.ndarray] | None = None  # the bytes of each entry, (nbytes,) uint8
    checksum: int = 0  # xxh3-64 of the bytes
    size: int = 0  # bytes in all
    transport: str = "object_store"  # object_store | shm | torch_dist
    path: str | None = None  # shm: the file holding the flat form
    buffer: torch.Tensor | None = (
        None  # torch_dist, on the receiver: the flat bytes, on the transport's device
    )

    @property
    def nbytes(self) -> int:
        return self.size

    def descriptor(self, transport: str, path: str | None = None) -> WeightBucket:
        """The same bucket without its bytes, for transports that move the bytes themselves."""
        return replace(self, arrays=None, transport=transport, path=path)

    def flat(self) -> np.ndarray:
        """All bytes in one buffer (a copy), for the transports that move one buffer."""
        assert self.arrays is not None
        return np.concatenate(self.arrays) if self.arrays else np.empty(0, dtype=np.uint8)

    def fill_from_flat(self, buffer: np.ndarray) -> WeightBucket:
        """Take the bytes from a received flat buffer (views, no copy)."""
        self.arrays = [buffer[e.offset : e.offset + e.nbytes] for e in self.entries]
        return self

    def fill_from_buffer(self, buffer: torch.Tensor) -> WeightBucket:
        """Take the bytes from a received flat tensor (torch_dist), on whichever device it is."""
        self.buffer = buffer
        return self

    def verify(self) -> bool:
        if self.buffer is not None:
            return self.buffer.numel() == self.size and buffer_checksum(self.buffer) == self.checksum
        return (
            self.arrays is not None
            and len(self.arrays) == len(self.entries)
            and all(a.nbytes == e.nbytes for a, e in zip(self.arrays, self.entries))
            and checksum(self.arrays) == self.checksum
        )

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) views of the bytes, no copy (the receiver copies into its own parameters)."""
        if self.buffer is not None:
            for e in self.entries:
                raw = self.buffer[e.offset : e.offset + e.nbytes]  # offsets are aligned (pack_flat)
                yield e.name, raw.view(getattr(torch, e.dtype)).view(e.shape)
            return
        assert self.arrays is not None
        for e, array in zip(self.entries, self.arrays):
            if not e.nbytes:  # an empty byte view cannot be reinterpreted
                yield e.name, torch.empty(e.shape, dtype=getattr(torch, e.dtype))
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zero-copy arrays from the object store are read-only
                raw = torch.from_numpy(array)
            yield e.name, raw.view(getattr(torch, e.dtype)).view(e.shape)


def pack_bucket(version: int, index: int, named: list[tuple[str, torch.Tensor]]) -> WeightBucket:
    """Describe the tensors as one bucket. The arrays are views of the (CPU) tensors, not copies: ship or copy
    the bucket before the tensors change."""
    entries, arrays, offset = [], [], 0
    for name, tensor in named:
        t = tensor.detach().contiguous().cpu()
        raw = t.view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        entries.append(
            TensorEntry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, raw.numel())
        )
        arrays.append(raw.numpy())
        offset += raw.numel()
    return WeightBucket(version, index, entries, arrays, checksum(arrays), offset)


_ALIGN = (
    16  # bytes: every tensor of a flat buffer starts at a multiple, so it can be viewed in place as any dtype
)


def pack_flat(
    version: int, index: int, named: list[tuple[str, torch.Tensor]], device: torch.device
) -> tuple[WeightBucket, torch.Tensor]:
    """The tensors' bytes in one flat uint8 tensor on `device` (one copy, none through the host when the tensors
    are already there), and the bucket's descriptor, whose checksum is that of the flat tensor (torch_dist)."""
    entries, offset = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(
            TensorEntry(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, nbytes)
        )
        offset += -(-nbytes // _ALIGN) * _ALIGN
    flat = torch.zeros(offset, dtype=torch.uint8, device=device)  # zeros: the padding is checksummed too
    for e, (_, tensor) in zip(entries, named):
        if e.nbytes:
            flat[e.offset : e.offset + e.nbytes].copy_(
                tensor.detach().contiguous().view(-1).view(torch.uint8)
            )
    bucket = WeightBucket(version, index, entries, None, buffer_checksum(flat), offset, "torch_dist")
    return bucket, flat


# ---------------------------------------------------------------------------------------------------------------
# transports: how a bucket's bytes travel when not through the object store


def shm_path(directory: str, bucket: WeightBucket) -> str:
    return f"{directory}/v{bucket.version}-b{bucket.index}.bin"


def write_shm(bucket: WeightBucket, directory: str) -> WeightBucket:
    """Write the bytes to a file in shared memory (/dev/shm: RAM, no disk); return the descriptor."""
    import os

    os.makedirs(directory, exist_ok=True)
    path = shm_path(directory, bucket)
    assert bucket.arrays is not None
    with open(path, "wb") as f:
        for array in bucket.arrays:
            f.write(memoryview(array))
    return bucket.descriptor("shm", path)


def read_shm(bucket: WeightBucket) -> WeightBucket:
    assert bucket.path is not None
    return bucket.fill_from_flat(np.fromfile(bucket.path, dtype=np.uint8))


@dataclass
class WeightGroup:
    """The torch_dist transport's process group and the bound on each of its broadcasts."""

    pg: Any
    timeout: timedelta


def open_weight_group(
    address: str, port: int, rank: int, world_size: int, timeout_s: float, backend: str
) -> WeightGroup:
    """A process group of learner rank 0 (rank 0, hosts the store) and the engines (ranks 1..N), separate from
    DeepSpeed's: gloo on CPU, NCCL on GPU. Blocks until every member has joined."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
    if backend == "gloo":
        return WeightGroup(dist.ProcessGroupGloo(store, rank, world_size, timeout), timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout  # how torch's own new_group sets it
    # NCCL's watchdog would tear the whole process down when a broadcast of this group times out (a member died
    # mid-sync); this group's failures are the sync's to handle: `broadcast_buffer` raises, `close_weight_group`
    # aborts. Read once, by the constructor: DeepSpeed's own group keeps the process's setting.
    saved = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
    try:
        return WeightGroup(dist.ProcessGroupNCCL(store, rank, world_size, options), timeout)
    finally:
        if saved is None:
            del os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"]
        else:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = saved


def broadcast_buffer(group: WeightGroup, buffer: torch.Tensor) -> torch.Tensor:
    """Rank 0 sends `buffer`; every other member receives into its `buffer` (same size, same device kind).
    Returns once the bytes are there; raises when they are not there within the group's timeout (a member died
    or hangs)."""
    group.pg.broadcast(buffer, 0).wait(group.timeout)
    if buffer.device.type == "cuda":  # `wait` orders the stream; the bytes are there once it has run
        torch.cuda.current_stream(buffer.device).synchronize()
    return buffer


def close_weight_group(group: WeightGroup | None) -> None:
    """Release a weight group, failed or replaced: NCCL's communicators are aborted (a collective stuck on a dead
    member would hold the GPU), gloo's connections close with the object."""
    abort = getattr(group.pg, "abort", None) if group is not None else None
    if abort is not None:
        with suppress(Exception):  # already broken: nothing more to release
            abort()


def receive_bucket(group, bucket: WeightBucket, device: torch.device) -> WeightBucket:
    """The engine's side of a torch_dist bucket: receive its bytes into a buffer on `device`."""
    buffer = torch.empty(bucket.size, dtype=torch.uint8, device=device)
    return bucket.fill_from_buffer(broadcast_buffer(group, buffer))


def module_of(name: str) -> str:
    """The module a parameter belongs to, at the granularity vLLM loads: `model.layers.3.mlp.up_proj.weight`
    -> `model.layers.3.mlp` (so gate/up and q/k/v land in the same bucket)."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[: min(i + 3, len(parts) - 1)])
    return ".".join(parts[:-1])


def group_into_buckets(
    named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group consecutive tensors into lists of about `bucket_bytes`, never splitting a module's parameters.
    Expects parameters in model order (as `named_parameters()` yields them)."""
    current: list[tuple[str, torch.Tensor]] = []
    size, module = 0, None
    for name, tensor in named:
        mod = module_of(name)
        if current and size >= bucket_bytes and mod != module:
            yield current
            current, size = [], 0
        current.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        module = mod
    if current:
        yield current
