"""fracture_ops.orchestration."""
