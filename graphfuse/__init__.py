"""graphfuse: FFN Fusion for ONNX models of transformer LLMs."""
__version__ = "0.1.0"
