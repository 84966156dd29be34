"""onnx-reparam: rewrites training-structure ONNX models into their deploy structure, exactly."""
from .api import VerificationError, bench, inspect, optimize, optimize_for_int8, quantize_check, verify
from .errors import ReparamError
from .model_io import load_model, save_model
from .report import Report, Verification

__all__ = [
           "ReparamError",
           "Report",
           "Verification",
           "VerificationError",
           "bench",
           "inspect",
           "load_model",
           "optimize",
           "optimize_for_int8",
           "quantize_check",
           "save_model",
           "verify",
]
__version__ = "0.1.0"
