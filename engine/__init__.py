"""casemask engine: disentanglement-based anonymization of medical images (arrays in, arrays out)."""
