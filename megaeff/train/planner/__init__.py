"""The layout planner (`megaeff-plan`, docs/planner.md): the fastest tp x cp x dp x pp layout of a model on a
cluster within its memory, from megaeff's own dry runs.

    cluster.py    the hardware: GPUs per node, memory, link bandwidths, peak FLOP/s (presets h100_sxm, a100_80gb)
    enumerate.py  the candidate layouts, pruned by stated rules and validated by megaeff's own config checks
    measure.py    per-rank peak memory and comm bytes per axis from the fake-tensor step at reduced depth and
                  micro-batch count, extrapolated (bilinear, per phase) to the real ones
    cost.py       FLOPs, compute time, exposed communication (overlap rules), pipeline bubble, MFU
    bounds.py     lower bounds without measuring: the memory floor (state) and the step time (compute, bubble,
                  the communication no overlap can hide)
    search.py     branch and bound: floors over the budget rejected, the rest measured in order of the step-time
                  bound until the top N are known (the exhaustive search's top N)
    report.py     the table, the rejected layouts by reason, the Hydra overrides and conf/parallel/ file
"""
