"""``python -m gptqflow`` (and ``torchrun -m gptqflow run ...``)."""

import sys

from gptqflow.cli import main

sys.exit(main())
