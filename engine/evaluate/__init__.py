"""Evaluation (a tool, not the core): mesh and image metrics, view scores, the toy benchmark.

``python -m engine.evaluate`` is its command (:mod:`engine.evaluate.command`).
"""

from engine.evaluate.command import main  # noqa: F401

__all__ = ["main"]
