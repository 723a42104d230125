"""Model containers graphfuse writes besides ONNX: nemotron-nas checkpoints (``nemotron_nas``)."""
