"""eval: Japanese evaluation (JGLUE / llm-jp-eval style, bits per character, JA MT-Bench)."""
