"""Data for distributed workers: a resumable sharded sampler, a loader on it, offline datasets."""

from distrain.data.loader import ResumableLoader, build_loader
from distrain.data.sampler import ResumableDistributedSampler

__all__ = ["ResumableDistributedSampler", "ResumableLoader", "build_loader"]
