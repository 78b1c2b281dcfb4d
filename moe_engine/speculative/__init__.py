"""Speculative decoding: proposers (config.py, ngram.py, draft.py), the verify/accept step (verify.py) and the
never-slower control that shortens k or turns speculation off per request (control.py)."""

from moe_engine.speculative.config import SpeculativeConfig, parse_speculative
from moe_engine.speculative.verify import Speculator

__all__ = ["SpeculativeConfig", "Speculator", "parse_speculative"]
