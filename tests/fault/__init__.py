"""Fault injection: killed processes, full filesystems."""
