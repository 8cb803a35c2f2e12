"""Inference helpers above the pipelines: many prompts over many processes (batch.py)."""

from .batch import ImageJob, RecordWriter, plan_images, shard_jobs, start_clock, summarize

__all__ = ["ImageJob", "RecordWriter", "plan_images", "shard_jobs", "start_clock", "summarize"]
