"""Measuring code behind ``dsr1 bench attention`` and ``dsr1 bench kvcache`` (the CLI in
:mod:`dsr1.commands.bench` only dispatches here)."""
