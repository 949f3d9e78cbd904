"""fracture_ops.monitoring."""
