"""Distillation and weight-combination methods built on the library core (``gen``), the samplers and tokenizers;
never on ``eval`` (the entry points wire evaluation in, e.g. the LCSC fitness)."""
