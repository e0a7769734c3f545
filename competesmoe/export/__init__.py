"""Handing a trained model to other tools: `competesmoe-ckpt` (ckpt_cli: inspect, verify, export),
the Hugging Face transformers export (hf) and its tokenizer (hf_tokenizer)."""
