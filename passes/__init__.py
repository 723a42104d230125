"""Rewrite passes of graphfuse (installed as ``graphfuse.passes``)."""
