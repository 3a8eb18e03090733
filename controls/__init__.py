"""Controllable generation: RelaCtrl (relevance-guided control) and a PixArt-δ-style ControlNet baseline,
both side branches that return per-block residuals to a base DiT."""
