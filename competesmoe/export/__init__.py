"""Handing a trained model to other tools: Hugging Face transformers export (hf), its tokenizer (hf_tokenizer)."""
