"""Model building and loading: tokenizer, component configs, base pipelines."""
