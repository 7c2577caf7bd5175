"""Alias of dsr1's public API, so the seed's ``from deepseek_r1 import AutoModel`` runs unchanged."""
from dsr1 import __version__
from dsr1.auto import AutoModel, AutoTokenizer
from dsr1.config import EngineConfig

__all__ = ["AutoModel", "AutoTokenizer", "EngineConfig", "__version__"]
