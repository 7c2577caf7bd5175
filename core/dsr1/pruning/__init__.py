"""What pruning shares below its plugins and drivers: masks and scores (:mod:`.masks`), calibration
statistics (:mod:`.calibration`), sparsity and accuracy metrics (:mod:`.metrics`), evaluation and
calibration text (:mod:`.data`), and pruning while a model loads (:mod:`.at_load`, the ``pruning:``
config key).

Plugins reach the first three through :mod:`dsr1_sdk.pruning`; the ``dsr1 prune`` driver is
:mod:`dsr1.tasks.prune`.
"""
