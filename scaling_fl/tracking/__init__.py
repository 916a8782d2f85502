"""Sacred experiment, observers, the rank-0 -> launcher event channel, metrics and plots."""
