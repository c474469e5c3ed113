"""Demo-only code: the real-text corpus from Debian packages and the tiny teachers pre-trained in place."""
