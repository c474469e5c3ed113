"""Stage one: reading the corpus, windows and masking, running teachers, writing shards in the background."""
