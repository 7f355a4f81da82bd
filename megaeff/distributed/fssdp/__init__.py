"""Fully sharded sparse data parallelism: the compact training state sharded over dp x cp.

engine.py     `FSSDP`, the facade the trainer uses, and `FSSDPEngine`: gather each unit before it computes,
              prefetch the next, reshard after forward, refill before backward
plan.py       `ShardingPlan`, built once: which tensors are sharded over which group, the units, prefetch order
grad_sync.py  `FSSDPGradSync`: reduce-scatter during backward, `prepare(final)` / `finish()` / `describe()`
state.py      `FSSDPState`: the layout-independent view (checkpoints), the interface of logical_state.LogicalState
tally.py      `ByteTally`: the bytes and gathers of one step, shared by the parts
layout.py     the sharding rule (whole COAT groups per shard) and the flat buffers the collectives carry
units.py      a unit, one forward call of it, a launched gather, the autograd Function between them
embedding.py  the embedding's sparse path: only the batch's rows are gathered
"""
