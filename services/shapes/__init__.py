"""Procedural image-caption data (shapes on backgrounds), its held-out split, and the prompt-adherence evaluator.

``scenes``: vocabulary, seeded sampling, captions, held-out triples; ``render``: the torch renderer;
``evaluate``: the attribute classifier (committed weights) and adherence scores; ``model``: the demo model's
Flux.1 architecture (shared by the training script, its export and the tests).
"""
