"""Prompts as text: AUTOMATIC1111's syntax (syntax.py: weights, BREAK, <lora:...> tags), the CLIP BPE
tokenizer (tokenizer.py), 75-token chunks and weighted encoding (chunks.py), and the prompt encoder with
its cache (encoder.py)."""
