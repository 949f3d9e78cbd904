"""fracture_ops.registry."""
