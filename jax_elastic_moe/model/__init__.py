"""Flax NNX MoE decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 / V3.2, GLM-4.5, gpt-oss."""
from .decoder import MoEModel
from .moe import EPContext

__all__ = ["MoEModel", "EPContext"]
