import sys

from engine.evaluate.command import main

sys.exit(main())
