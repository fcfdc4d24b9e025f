"""Data side: audio loading, features, tokenizer, input lists."""
