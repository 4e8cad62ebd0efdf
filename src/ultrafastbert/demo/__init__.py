"""What ``make demo`` does (:mod:`.convert_demo`): a real pretrained sentence encoder converted to
FFF, its quality and speed measured side by side with the dense model, then used.

The library part logs and returns results; ``ultrafastbert demo`` (:mod:`ultrafastbert.cli.demo`)
prints them.
"""
