"""Text-embeddings-inference (TEI) routes: ``/embed_sparse``."""
