"""One model across several processes through torch.distributed (docs/parallel.md).

:mod:`.topology` reads the ``torchrun`` world and creates the process group; :mod:`.tensor` holds
the tensor-parallel layers and reads each rank's shards of a checkpoint. Importing this package
creates no process group: :func:`.topology.join` does, when a model with ``parallel.tensor`` > 1 is built.
"""
