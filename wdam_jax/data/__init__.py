"""Data: dataset readers, demo data, augmentations, FMAS TFRecords and tf.data pipelines.

Submodules are imported explicitly (``from wdam_jax.data import datasets``) so that importing the
numpy readers does not import TensorFlow.
"""
