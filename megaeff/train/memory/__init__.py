"""Whole-step memory: a live-tensor tracker (tracker.py) and one rank's training step on fake tensors
(fake_step.py), behind `megaeff-estimate-memory --measure`."""
