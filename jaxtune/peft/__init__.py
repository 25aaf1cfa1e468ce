"""Parameter-efficient fine-tuning: LoRA/rsLoRA/DoRA adapters (lora.py), QLoRA base quantisation
(quant.py) and PEFT-format / merged export (export.py, imports models; not imported here)."""
