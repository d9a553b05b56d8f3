"""``python -m lejepa`` (also what ``torchrun -m lejepa train …`` runs)."""

import sys

from lejepa.cli import main

sys.exit(main())
