"""``loraplex train``: LoRA fine-tuning with peft on JSONL data, held-out evaluation of the base
model against the adapter, and the demo task. Imported only by the ``train`` command (it pulls
in torch, transformers and peft)."""
