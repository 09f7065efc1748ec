"""Seed module path: ``import tensorspark.core.spark_session as sps``."""

from ..session import RunSummary, SparkSession

__all__ = ["RunSummary", "SparkSession"]
