"""Llama-family model and its loader."""
