"""Test-session set-up.

torchvision's import pulls in triton (through ``torch._dynamo``), and triton's native library
segfaults at load time when TensorFlow's is already in the process (tensorflow-cpu 2.21 +
triton 3.8, the CUDA torch build's dependency). Loading torchvision first is safe, so the session
does that before any test module imports TensorFlow.
"""

import pathlib

import pytest
import torchvision  # noqa: F401


@pytest.fixture(scope="session")
def demo_data_root(tmp_path_factory) -> pathlib.Path:
    """The built-in demo data, generated once per test worker (``data.root`` of demo configs)."""
    from wdam_jax.data import demo, sources

    root = tmp_path_factory.mktemp("demo_data")
    demo.ensure_demo_data(root, seed=sources.DEMO_SEED, image_size=sources.DEMO_SOURCE_SIZE)
    return root
