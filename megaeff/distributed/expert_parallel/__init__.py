"""MoE experts over the dp x cp group: expert FSSDP (load-proportional placement) and fixed expert parallelism.

placement.py  where each expert's replicas run this step, and the token exchange that implies (`StepPlan`)
experts.py    the distributed expert modules, their flat parameters and `parallelize_experts`
"""
