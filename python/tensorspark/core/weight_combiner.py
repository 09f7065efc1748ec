"""Seed module path: ``import tensorspark.core.weight_combiner as comb``."""

from ..combiners import DeltaCombiner, DeltaWeightCombiner, MeanCombiner, MeanWeightCombiner

__all__ = ["DeltaCombiner", "DeltaWeightCombiner", "MeanCombiner", "MeanWeightCombiner"]
