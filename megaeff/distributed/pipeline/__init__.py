"""Pipeline parallelism over the pp group.

stages.py    the stage split of the model (even or at given boundaries, virtual stages), on the meta device
schedule.py  GPipe / 1F1B / interleaved 1F1B as plain data (`PIPELINE_SCHEDULES`), and the event simulator
runner.py    `PipelineRunner` / `PipelineStep`: what each action of a schedule does, with batched p2p through
             comm.py (the loop over the actions is the trainer's one accumulation loop, megaeff/train/step.py)
"""
