"""The built-in stages, one module each.

They are registered like any plugin: through the ``gptqflow.stages`` entry points in
``pyproject.toml`` (see :mod:`gptqflow.framework.registry`), not by importing this package.
"""
