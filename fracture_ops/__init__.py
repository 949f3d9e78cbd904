"""fracture-ops."""
