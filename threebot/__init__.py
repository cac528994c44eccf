"""threebot."""
