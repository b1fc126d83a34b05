"""Small files that change what a model draws: LoRA (lora.py) and textual-inversion embeddings
(textual_inversion.py), read without running code and checked before they are used."""
