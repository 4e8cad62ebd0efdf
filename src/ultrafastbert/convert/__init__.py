"""Convert a pretrained BERT-family model into FFF blocks by distillation (``ultrafastbert convert``).

Needs the ``hf`` extra (transformers, tokenizers, safetensors).
"""
