"""Scoring generated images.

Owns the feature extractors (`extractors.py`: pytorch-fid's Inception from a local weights
file, the offline classifier), Frechet distances and class statistics (`fid.py`),
precision and recall on k-NN manifolds of the same features (`manifold.py`), and the
evaluation of a model or a run (`evaluate.py`: distributed sampling, reference statistics,
per-client scores of personal models, re-scoring checkpoints).

May import: fedmpi.model, fedmpi.data, fedmpi.dist, fedmpi.store, fedmpi.config,
fedmpi.errors, fedmpi.runtime.
"""
