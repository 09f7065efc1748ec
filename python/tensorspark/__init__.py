"""tensorspark: TensorFlow training on Apache Spark with a C++ parameter server.

The seed-compatible entry point is :class:`SparkSession`; the parameter
server and its client are in :mod:`tensorspark.ps`; errors in
:mod:`tensorspark.errors`. TensorFlow and PySpark are imported only when
used.
"""

from importlib import metadata as _metadata

from ._secret import read_secret_file
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
    SparkDriverError,
    StaleGPUWorkerError,
    TensorSparkError,
    TensorSparkValueError,
    VariableNotFoundError,
)
from .ps import ParameterServer, PSClient, ShardedPSClient, generate_secret, make_tls_identity
from .tf1.session import RunSummary, SparkSession

# The version has one source, pyproject.toml, read back from the installed
# package's metadata (CMake gets it from the same file).
try:
    __version__ = _metadata.version("tensorspark")
except _metadata.PackageNotFoundError:  # imported from a tree that was never installed
    __version__ = "0+unknown"

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
    "SparkDriverError",
    "StaleGPUWorkerError",
    "SparkSession",
    "TensorSparkError",
    "TensorSparkValueError",
    "VariableNotFoundError",
    "generate_secret",
    "make_tls_identity",
    "read_secret_file",
]
