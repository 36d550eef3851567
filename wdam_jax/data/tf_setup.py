"""The one place TensorFlow is imported for the JAX side: TF must never take a GPU from JAX."""

from __future__ import annotations

import functools


@functools.cache
def import_tensorflow():
    """Imports TensorFlow with every GPU hidden from it and returns the module.

    ``tf.data`` only decodes and batches on the host; hiding GPUs keeps TF from reserving
    accelerator memory that JAX needs. Call this instead of ``import tensorflow``.
    """
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        # Devices were already initialised by someone else's import; check nothing got a GPU.
        if tf.config.get_visible_devices("GPU"):
            raise RuntimeError(
                "TensorFlow initialised a GPU before wdam_jax.data.tf_setup could hide it; "
                "import wdam_jax data modules before using TensorFlow directly."
            ) from None
    return tf
