"""Where a delta comes from: a classic COW table, thin_delta, or a compare of two images."""
