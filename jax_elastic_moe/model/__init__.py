"""Flax NNX MoE decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3."""
from .decoder import MoEModel
from .moe import EPContext

__all__ = ["MoEModel", "EPContext"]
