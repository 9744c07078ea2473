"""Weights in transit: named tensors grouped into checksummed buckets.

A bucket is a table of (name, dtype, shape, offset) plus the tensors' bytes as uint8 numpy arrays: numpy (not
torch) so the Ray object store hands engines zero-copy views; the checksum (xxh3-64, ~15 GB/s here, 6x crc32) lets
the receiver detect a corrupted bucket before loading it. Buckets never split one module's parameters (vLLM fuses
q/k/v and gate/up into one kernel per module and processes a module once all its weights have arrived).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta

import numpy as np
import torch
import xxhash


def checksum(arrays: Iterable[np.ndarray]) -> int:
    """xxh3-64 over the arrays' bytes, in order (the same value for the per-tensor and the flat form)."""
    digest = xxhash.xxh3_64()
    for array in arrays:
        digest.update(memoryview(array))
    return digest.intdigest()


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

    def verify(self) -> bool:
        return (
            self.arrays is not None
            and len(self.arrays) == len(self.entries)
            and all(a.nbytes == e.nbytes for a, e in zip(self.arrays, self.entries))
            and checksum(self.arrays) == self.checksum
        )

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) views of the bytes, no copy (the receiver copies into its own parameters)."""
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


def open_weight_group(address: str, port: int, rank: int, world_size: int, timeout_s: float, backend: str):
    """A process group of learner rank 0 (rank 0, hosts the store) and the engines (ranks 1..N), separate from
    DeepSpeed's: gloo on CPU, NCCL on GPU. Blocks until every member has joined."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def broadcast_buffer(group, buffer: torch.Tensor) -> torch.Tensor:
    """Rank 0 sends `buffer`; every other member receives into its `buffer` (same size)."""
    group.broadcast(buffer, 0).wait()
    return buffer


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
