"""Shared fixtures: one local Ray cluster per test session, and tiny models written once per session."""

from __future__ import annotations

import os

import pytest

from aha.actors.runtime import apply_base_env

apply_base_env()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub (tests of Hub ids use a local cache)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords also hold folder names (a checkout named gpu)
        if item.get_closest_marker("gpu") is not None and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with more logical CPUs than cores (actors mostly wait), shared by every test of the session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=int(os.environ.get("AHA_TEST_RAY_CPUS", "8")),
            namespace="aha-tests",
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={
                "env_vars": {
                    k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "HF_", "DS_", "TORCH_EXT"))
                }
            },
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Qwen2 model with a character-level tokenizer (seed 0)."""
    from aha.cluster.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model-a"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory):
    """Same architecture and tokenizer as `tiny_model`, different random weights (seed 1)."""
    from aha.cluster.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model-b"), seed=1)
