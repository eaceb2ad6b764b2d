"""Pure functions (no parameters, no hidden state) that the layers are built from."""
