"""Data: indexed .bin/.idx datasets, the GPT sample index and blending, tokenizer, mock data, sampler."""
