"""Buckets in transit: packing, the flat form the shm / torch_dist transports move, checksums, grouping."""

from __future__ import annotations

import torch

from aha.actors.weights import (
    checksum,
    group_into_buckets,
    module_of,
    pack_bucket,
    read_shm,
    write_shm,
)


def named_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 4, generator=g)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(8, generator=g)),
        ("model.layers.0.mlp.up_proj.weight", torch.randn(6, 4, generator=g).to(torch.bfloat16)),
        ("model.norm.weight", torch.randn(4, generator=g)),
        ("model.empty", torch.empty(0)),
    ]


def test_a_bucket_gives_back_its_tensors_exactly():
    named = named_tensors()
    bucket = pack_bucket(3, 1, named)
    assert (bucket.version, bucket.index) == (3, 1)
    assert bucket.size == sum(t.numel() * t.element_size() for _, t in named)
    assert bucket.verify()
    for (name, original), (got_name, got) in zip(named, bucket.tensors()):
        assert got_name == name and got.dtype == original.dtype and got.shape == original.shape
        assert torch.equal(got, original)


def test_the_flat_form_has_the_same_bytes_and_checksum():
    bucket = pack_bucket(1, 0, named_tensors())
    flat = bucket.flat()
    assert flat.nbytes == bucket.size
    assert checksum([flat]) == bucket.checksum  # one checksum for the per-tensor and the flat form
    received = bucket.descriptor("torch_dist").fill_from_flat(flat.copy())
    assert received.verify()
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(received.tensors(), bucket.tensors()))


def test_a_flipped_byte_fails_verification():
    bucket = pack_bucket(1, 0, named_tensors())
    bucket.arrays = [a.copy() for a in bucket.arrays]
    bucket.arrays[2][0] ^= 0x01
    assert not bucket.verify()
    assert not bucket.descriptor("shm").verify()  # no bytes at all


def test_shm_round_trip(tmp_path):
    bucket = pack_bucket(2, 5, named_tensors())
    descriptor = write_shm(bucket, str(tmp_path))
    assert descriptor.arrays is None and descriptor.path is not None
    received = read_shm(descriptor)
    assert received.verify()
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(received.tensors(), bucket.tensors()))


def test_buckets_never_split_a_module():
    named = [
        (f"model.layers.{i}.{part}.weight", torch.zeros(256))  # 1 KiB each
        for i in range(3)
        for part in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    buckets = list(group_into_buckets(named, bucket_bytes=1024))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]  # order kept, nothing lost
    modules = [{module_of(n) for n, _ in b} for b in buckets]
    for i, a in enumerate(modules):
        for b in modules[i + 1 :]:
            assert not a & b, "a module's parameters landed in two buckets"
    assert module_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp"
    assert module_of("model.embed_tokens.weight") == "model.embed_tokens"
