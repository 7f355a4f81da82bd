"""MoE experts over the dp x cp group: expert FSSDP (load-proportional placement) and fixed expert parallelism
(experts.py)."""
