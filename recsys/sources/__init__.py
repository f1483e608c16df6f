"""Catalogue sources: one module per input format, all mapping into the canonical schema."""
