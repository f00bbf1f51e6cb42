"""pretrain: Mistral and Mixtral models and their DeepSpeed ZeRO training with phased data mixtures."""
