"""graphfuse: FFN Fusion for ONNX models of transformer LLMs (arXiv 2503.18908)."""

from graphfuse.api import FusionReport, Inspection, fuse, fuse_file, inspect
from graphfuse.errors import GraphfuseError
from graphfuse.export import fuse_module
from graphfuse.plan import Plan, apply

__version__ = "0.1.0"
__all__ = [
    "FusionReport",
    "GraphfuseError",
    "Inspection",
    "Plan",
    "apply",
    "fuse",
    "fuse_file",
    "fuse_module",
    "inspect",
]
