"""Few-step distillation and weight combination, built on the library core (``gen``), the samplers and tokenizers.

* ``distill.teacher``: a frozen teacher from any snapshot (prediction spec, sampler, identity) and the refusals.
* ``distill.pairs``: ``python -m distill.pairs`` draws (noise, teacher endpoint, label) shards; ``PairShards`` reads them.
* ``distill.losses``: the pseudo-Huber distances; ``distill.perceptual``: LPIPS and the yardstick's stand-in for it.
* ``distill.reflow``: 2-rectified flow++ on fixed pairs (Lee et al. 2024).
* ``distill.cd``: consistency distillation with the teacher's Heun step (Song et al. 2023).
* ``distill.tdm``: trajectory distribution matching, a K-step student and its fake score as two phases (Luo et al. 2025).
* ``distill.slam``: the sub-path linear approximation model, consistency along sub-path linear ODEs (Xu et al. 2024).
* ``distill.lcsc``: LCSC's evolutionary search over the coefficients of saved checkpoints (Liu et al.).

This package may import ``gen``, ``samplers`` and ``tokenizers``; never ``eval`` (the entry points wire evaluation
in, e.g. the LCSC fitness); nothing in ``gen`` imports it (tests/test_layering.py).
"""
