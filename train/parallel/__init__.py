"""Scaling by configuration: ZeRO, tensor parallel, MoE and expert parallel applied from outside."""

from vlforge.train.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
