"""mdkd: merge several masked language models into one student by knowledge distillation."""

__version__ = "0.1.0"
