"""hrm-lora: HRM recurrence as PEFT LoRA adapters on a pretrained causal LM (see plugin.py)."""
