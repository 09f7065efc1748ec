"""Module paths of the original TensorSpark (``tensorspark.core.*``).

Programs written for it import ``tensorspark.core.spark_session as sps`` and
``tensorspark.core.weight_combiner as comb``; both keep working.
"""
