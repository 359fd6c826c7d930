"""tinytis: a minimal inference engine for Mistral-architecture models with learned KV-cache eviction."""
