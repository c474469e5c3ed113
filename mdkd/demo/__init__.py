"""Demo-only code: the demo's settings, its real-text corpus from Debian's packages (corpus/), its teachers
pre-trained in place, its mdkd configs, and its summary and held-out loss plot. The tiny-model builders the teachers
use are shared with the tests, benchmarks and examples, so they live in mdkd/tiny_models.py."""
