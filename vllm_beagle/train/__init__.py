"""The offline trainer: Two-Stage Block-Attention Training of Beagle drafts (no vLLM import)."""
