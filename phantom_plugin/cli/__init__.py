"""The command-line tools: ``phantom-plan`` (:mod:`.plan`) and ``phantom-bench`` (:mod:`.bench`)."""
