"""xDS resources parsed once into frozen dataclasses; the running config is swapped whole."""
