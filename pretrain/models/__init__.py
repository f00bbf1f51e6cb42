"""Model architectures: one package per family, each with args, model and state-dict adapter."""
