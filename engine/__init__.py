"""Score-distillation engine: the model-agnostic core.

Nothing in this package imports a guidance model or a representation by name; plugins are
found through :mod:`engine.registry`.
"""

__version__ = "0.1.0"
