"""Drivers of dsr1's long-running commands, apart from the libraries they drive.

* :mod:`.prune` - ``dsr1 prune``: progressive pruning, stage after stage, saved and measured.
* :mod:`.quantize` - ``dsr1 quantize``: load through a quant plugin, write the quantized directory.

The CLI (:mod:`dsr1.commands`) parses arguments and calls these through their public functions.
"""
