"""finetune: supervised fine-tuning and DPO of kinoe models in Hugging Face format."""
