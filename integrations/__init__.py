"""Entry points for other people's programs (Megatron-LM ``--spec`` objects, launch glue)."""
