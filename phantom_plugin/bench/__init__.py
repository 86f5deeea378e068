"""Benchmarks and the side-by-side demo: a TP baseline from megatron-core's own layers, a
training runner shared by ``make demo`` and ``phantom-bench``, and reporting."""
