"""``python -m dsr1``: the ``dsr1`` command, also as ``torchrun --nproc-per-node N -m dsr1 generate ...``."""
from dsr1.cli import entry

entry()
