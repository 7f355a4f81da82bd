"""Fully sharded sparse data parallelism: the compact training state sharded over dp x cp.

engine.py     `FSSDP`: shards the parameters, gathers each unit before it computes and reshards after
layout.py     the sharding rule (whole COAT groups per shard) and the flat buffers the collectives carry
units.py      a unit, one forward call of it, a launched gather, the autograd Function between them
embedding.py  the embedding's sparse path: only the batch's rows are gathered
state.py      the layout-independent view (checkpoints): logical tensors gathered from and cut into shards
"""
