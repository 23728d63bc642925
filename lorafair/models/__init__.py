"""The client models, one per family behind one interface (`build.build_model`): a timm image classifier (`image`)
and a transformers language model (`text`), both adapted by peft LoRA whose state they swap in and out (`lora`)."""
