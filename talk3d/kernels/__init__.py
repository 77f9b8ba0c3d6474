"""The device code: CUDA ``.cu`` kernels and Triton kernels, one subpackage per op.

Their sources live in the repository's top-level ``kernels/`` folder and ship here as
``talk3d.kernels.<op>`` (``setup.py`` maps each subpackage; the ``.cu``/``.h``/``.cuh`` files are
package data). That folder has no ``__init__.py`` of its own on purpose: run from the repository
root (``python -m pytest``, ``python -m talk3d.train``), a regular package there would shadow any
installed top-level ``kernels`` package, such as Hugging Face's, which ``transformers`` imports.
"""
