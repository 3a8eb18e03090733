"""KV caches shared by VAR and the vision-language decoders, with exact memory accounting and a compression
policy interface (full; ScaleKV)."""

from .kv import CachePolicy, FullCache, KVCache, LayerKV, kv_bytes

__all__ = ["CachePolicy", "FullCache", "KVCache", "LayerKV", "kv_bytes"]
