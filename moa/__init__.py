"""Mixture of Adapters: route a causal LM through a library of LoRA adapters per query."""

from .config import MoAConfig, RouteSettings
from .engine import MoA, QueryError
from .trace import AdapterUse, Iteration, TokenError, Trace

__all__ = ["MoA", "MoAConfig", "QueryError", "RouteSettings", "Trace", "Iteration", "AdapterUse", "TokenError"]
__version__ = "0.1.0"
