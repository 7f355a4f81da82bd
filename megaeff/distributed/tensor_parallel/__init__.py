"""Tensor (and sequence) parallelism over the tp group.

layers.py    `parallel_linear`: a single-process linear of any method -> its column/row-parallel form
base.py      the common machinery of TP linears, and the dense Megatron pair
factored.py  lowrank, SLTrain and LOST in compact form (factors and sparse values sharded, never a dense weight)
vocab.py     vocab-parallel embedding and cross-entropy
mappings.py  Megatron's conjugate autograd collectives (copy/reduce to and from the region, sequence gather/scatter)
sequence.py  the sequence-parallel RMSNorm and the loss over vocab shards
"""
