"""tokenizer: SentencePiece training, Hugging Face export and encoding of documents into token shards."""
