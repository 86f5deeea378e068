"""Megatron-LM entry points: ``--spec integrations.megatron_lm.phantom_spec phantom_layer_spec``."""
