"""Pieces every method shares, each written once (anomalib's ``components/``):

- :mod:`~wdam_jax.components.gaussian`: Ledoit-Wolf Gaussian fits and the jnp Mahalanobis
  distance (CutPaste's densities);
- :mod:`~wdam_jax.components.scoring`: a method's scoring as one pure function over fixed-size
  batches (:class:`~wdam_jax.components.scoring.Scorer`), the compiled inference forward, and
  the fill of a model's variables outside the train state.

Shared maths elsewhere: the Gaussian blur and filters (:mod:`wdam_jax.filters`), batching
(:func:`wdam_jax.data.pipeline.map_batches`), augmentation arguments from the config
(:func:`wdam_jax.data.augment.options`). Nothing here imports a method or the loop.
"""
