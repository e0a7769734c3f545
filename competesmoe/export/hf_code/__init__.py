"""The modeling code copied into every Hugging Face export (it imports torch and transformers only)."""
