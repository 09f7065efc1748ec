"""Seed module path: ``import tensorspark.core.spark_session as sps``."""

from ..tf1.session import RunSummary, SparkSession

__all__ = ["RunSummary", "SparkSession"]
