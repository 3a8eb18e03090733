"""KV caches shared by VAR and the vision-language decoders, with exact memory accounting and a compression
policy interface (full; ScaleKV)."""
