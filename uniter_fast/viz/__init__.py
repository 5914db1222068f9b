"""Plots: training curves and attention maps."""
