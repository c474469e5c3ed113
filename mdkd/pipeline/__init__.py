"""Reusable machinery behind the `mdkd` stages: config, corpus, masking, teachers, shards, manifest."""
