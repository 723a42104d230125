"""Model definitions and export recipes (installed as ``graphfuse.models``)."""
