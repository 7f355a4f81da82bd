"""Pipeline parallelism over the pp group.

stages.py    the stage split of the model (even or at given boundaries, virtual stages), on the meta device
schedule.py  GPipe / 1F1B / interleaved 1F1B as plain data, and the event simulator that checks them
runner.py    `PipelineRunner`: runs a schedule's actions with batched p2p through comm.py
"""
