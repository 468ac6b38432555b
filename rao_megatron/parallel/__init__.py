"""Process-group helpers: launching gloo workers on CPU and reading the parallel layout."""
