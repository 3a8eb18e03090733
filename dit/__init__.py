"""Diffusion transformers: DiT (class→image), PixArt-style text→image, Latte-style text→video, their pipelines
and loaders, and the efficiency methods that each change one piece of them (DyDiT, TREAD, PPCL, TerDiT)."""
