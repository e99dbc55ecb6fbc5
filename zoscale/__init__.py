"""zoscale: zeroth-order optimizers on sharded parameters."""
