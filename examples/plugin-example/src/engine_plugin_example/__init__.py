"""An external plugin package for distill-engine, kept in the engine's repository as the
worked example of docs/writing-a-guidance-plugin.md.

It adds, through entry points only (see pyproject.toml):

* guidance ``example-l1`` (:class:`engine_plugin_example.guidance.ExampleL1`): L1 colour
  and mask losses between the rendered reference view and the input picture;
* recipe ``example-fit`` (``recipes/example-fit.yaml``): a short voxel-grid fit of the input
  picture with that guidance.

Nothing here is imported by the engine until a recipe names ``example-l1`` or
``python -m engine.run --list`` lists every plugin.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__version__ = "0.1.0"


def example_fit_recipe() -> Path:
    """Path of the ``example-fit`` recipe shipped inside this package.

    The ``engine.recipes`` entry point names this function; the engine calls it and reads
    the YAML file it returns (an entry point may also name a path or a dict).
    """
    return Path(str(resources.files(__name__) / "recipes" / "example-fit.yaml"))
