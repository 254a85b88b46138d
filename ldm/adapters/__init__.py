"""Adapters on released or trained models: LoRA (peft), textual-inversion embeddings."""
