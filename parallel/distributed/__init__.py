"""The pieces of the 3-D engine (pipeline x data/ZeRO x tensor) that parallel.trainer.Trainer lays a model out
with: the mesh and its degrees (mesh.py; the layout rules are parallel.layout), TP plans
(tensor_parallel.py), pipeline stages (pipeline.py), ZeRO/FSDP (zero.py), global grad clipping (grads.py),
DCP training-state checkpoints (checkpoint.py: any layout -> any layout), and
`launch(fn, world_size, *args)`, which runs fn(rank, world_size, *args) on forked local gloo ranks (tests).
"""
