"""Few-step distillation: frozen teachers, noise-image pairs, reflow / 2-rectified flow++ and consistency distillation.

* ``distill.teacher``: a frozen teacher from any snapshot (prediction spec, sampler, identity) and the refusals.
* ``distill.pairs``: ``python -m distill.pairs`` draws (noise, teacher endpoint, label) shards; ``PairShards`` reads them.
* ``distill.losses``: the pseudo-Huber distances and the perceptual (LPIPS) term.
* ``distill.reflow``: 2-rectified flow++ on fixed pairs (Lee et al. 2024).
* ``distill.cd``: consistency distillation with the teacher's Heun step (Song et al. 2023).

This package may import ``gen``, ``samplers`` and ``tokenizers``; nothing in ``gen`` imports it (tests/test_layering.py).
"""
