"""One module per CLI verb; each is a short recipe: set up, run, save."""
