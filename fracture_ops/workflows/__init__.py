"""Workflows that compose stages: cross-validation trains folds with ``training`` and measures
them with ``evaluation``'s patient bootstrap. They sit above the stages (ARCHITECTURE.md)."""
