"""Megatron-LM entry points: ``--spec phantom_plugin.integrations.megatron_lm.phantom_spec phantom_layer_spec``."""
