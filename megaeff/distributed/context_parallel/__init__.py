"""Context parallelism: attention over a sequence sharded across the cp group.

attention.py  `ContextParallelAttention`, the attention backend the model calls
sharding.py   contiguous / zigzag chunks of the sequence and their global positions
blocks.py     block attention, the causal block plan, the log-sum-exp merge
ring.py       ring attention;  lightseq.py  LightSeq DistAttn;  ulysses.py  DeepSpeed-Ulysses
"""
