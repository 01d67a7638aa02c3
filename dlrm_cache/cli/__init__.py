"""Thin command-line entry points; the work lives in functions that tests call directly."""
