"""``python -m dno`` (also under ``torchrun -m dno``): the command line of ``dno/cli.py``."""
import sys

from .cli import main

sys.exit(main())
