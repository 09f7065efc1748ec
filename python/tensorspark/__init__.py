"""tensorspark: TensorFlow training on Apache Spark with a C++ parameter server.

The seed-compatible entry point is :class:`SparkSession`; the parameter
server and its client are in :mod:`tensorspark.ps`; errors in
:mod:`tensorspark.errors`. TensorFlow and PySpark are imported only when
used.
"""

from .combiners import (
    DeltaCombiner,
    DeltaWeightCombiner,
    ElasticCombiner,
    MeanCombiner,
    MeanWeightCombiner,
)
from .errors import (
    AddressInUseError,
    AuthenticationError,
    FencedError,
    ProtocolError,
    PSConnectionError,
    PSTimeoutError,
    ShapeMismatchError,
    TensorSparkError,
    TensorSparkValueError,
    VariableNotFoundError,
)
from .ps import ParameterServer, PSClient, ShardedPSClient, generate_secret
from .tf1.session import RunSummary, SparkSession

__version__ = "0.1.0"

__all__ = [
    "AddressInUseError",
    "AuthenticationError",
    "FencedError",
    "DeltaCombiner",
    "DeltaWeightCombiner",
    "ElasticCombiner",
    "MeanCombiner",
    "MeanWeightCombiner",
    "ParameterServer",
    "PSClient",
    "PSConnectionError",
    "PSTimeoutError",
    "ProtocolError",
    "RunSummary",
    "ShapeMismatchError",
    "ShardedPSClient",
    "SparkSession",
    "TensorSparkError",
    "TensorSparkValueError",
    "VariableNotFoundError",
    "generate_secret",
]
