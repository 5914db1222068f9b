"""Plots: training curves (and, later, attention maps)."""
