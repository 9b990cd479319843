"""Curation on top of embeddings: deduplication, classifiers, caption scores, search, resharding, export."""
