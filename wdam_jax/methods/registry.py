"""Methods by name (``config.method``): the only place the loop learns which methods exist.

Entries are ``"module:Class"`` strings, imported on first use so that building one method never
imports another's dependencies. Adding a method is one line here (see ``docs/design.md``).
"""

from __future__ import annotations

import importlib

import ml_collections

from wdam_jax.methods.base import Method

METHODS: dict[str, str] = {
    "cutpaste": "wdam_jax.methods.cutpaste:CutPaste",
    "patchcore": "wdam_jax.methods.patchcore_method:PatchCore",
    "draem": "wdam_jax.methods.draem:Draem",
}


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"config.method={name!r} is not one of {sorted(METHODS)}; fix the config.")
    module, attr = METHODS[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    if not issubclass(cls, Method) or cls.name != name:
        raise TypeError(f"{METHODS[name]} must subclass wdam_jax.methods.base.Method as {name!r}.")
    return cls


def get_method(config: ml_collections.ConfigDict) -> Method:
    """Builds the method named by ``config.method`` from ``config``."""
    return method_class(config.method)(config)
