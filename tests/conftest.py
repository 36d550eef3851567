"""Test-session set-up.

torchvision's import pulls in triton (through ``torch._dynamo``), and triton's native library
segfaults at load time when TensorFlow's is already in the process (tensorflow-cpu 2.21 +
triton 3.8, the CUDA torch build's dependency). Loading torchvision first is safe, so the session
does that before any test module imports TensorFlow.
"""

import pathlib
import tempfile

import jax
import pytest
import torchvision  # noqa: F401

# Tests build the same small programs many times (one train() call = one jit of a new partial):
# XLA's persistent cache turns the repeats into cache hits. Keyed by the program, the flags and
# the jax version, so a stale entry cannot be hit.
jax.config.update(
    "jax_compilation_cache_dir",
    str(pathlib.Path(tempfile.gettempdir()) / "wdam_jax_test_xla_cache"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def demo_data_root(tmp_path_factory) -> pathlib.Path:
    """The built-in demo data, generated once per test worker (``data.root`` of demo configs)."""
    from wdam_jax.data import demo, sources

    root = tmp_path_factory.mktemp("demo_data")
    demo.ensure_demo_data(root, seed=sources.DEMO_SEED, image_size=sources.DEMO_SOURCE_SIZE)
    return root
