"""Stage two: the merged vocabulary, training data from the cache, losses, the student and its DeepSpeed training."""
