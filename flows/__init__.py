"""Prefect flows over the textadapt library."""
