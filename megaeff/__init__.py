"""megaeff: memory- and communication-efficient LLaMA pretraining (sparse+low-rank, FP8, 4-D parallelism)."""

__version__ = "0.1.0"
