"""Test-session set-up.

torchvision's import pulls in triton (through ``torch._dynamo``), and triton's native library
segfaults at load time when TensorFlow's is already in the process (tensorflow-cpu 2.21 +
triton 3.8, the CUDA torch build's dependency). Loading torchvision first is safe, so the session
does that before any test module imports TensorFlow.
"""

import torchvision  # noqa: F401
