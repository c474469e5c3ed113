"""Reusable machinery behind the `mdkd` stages: the cache contract (cache/), the teacher pass (teacher_pass/),
distillation (distill/) and evaluation, on shared config and rank bookkeeping."""
