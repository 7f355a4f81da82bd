"""Data parallelism with replicated parameters: bucketed gradient all-reduce over dp x cp, overlapped with the
last backward (bucketed.py). Sharded data parallelism is fssdp/."""
