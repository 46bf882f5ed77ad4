"""The toy base model `toy-sd1`: its procedural world, its pretraining script and its measurement."""
