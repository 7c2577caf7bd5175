"""One model across several processes through torch.distributed (docs/parallel.md).

:mod:`.topology` reads the ``torchrun`` world and creates the process group (and each pipeline
stage's tensor group); :mod:`.tensor` holds the tensor-parallel layers and reads each rank's shards
of a checkpoint; :mod:`.pipeline` splits the layers into stages and runs a stage's part of a forward.
Importing this package creates no process group: :func:`.topology.join` does, when a model with
``parallel.tensor`` or ``parallel.pipeline`` > 1 is built.
"""
