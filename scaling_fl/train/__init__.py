"""Local training, evaluation and the round loop."""
