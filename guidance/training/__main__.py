"""``python -m guidance.training`` (and ``accelerate launch -m guidance.training``): the
fine-tuning command, :mod:`guidance.training.command`."""

import sys

from guidance.training.command import main

if __name__ == "__main__":
    sys.exit(main())
