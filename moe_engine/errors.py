"""Re-export of the one user-facing exception type (defined at the bottom of the import graph)."""

from model_defs.errors import MoeEngineError

__all__ = ["MoeEngineError"]
