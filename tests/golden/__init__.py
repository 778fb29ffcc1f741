"""Golden vectors: framework outputs saved as .npz, checked against bnref with no framework."""
