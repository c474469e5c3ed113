"""The cache: the contract between stage one (the teacher pass) and stage two (distillation).

See docs/cache-format.md.
"""
