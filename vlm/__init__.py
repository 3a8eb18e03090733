"""Autoregressive vision models: VAR next-scale generation, a LLaVA-style vision-language model, and the
methods on top of it (DeepStack, SAISA/NAAViT)."""
