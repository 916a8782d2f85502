"""What is done with the sample-weighted mean update. Pure tensor math, no I/O, no collectives."""

from scaling_fl.strategies.base import Strategy
from scaling_fl.strategies.fedavg import FedAvg

__all__ = ["FedAvg", "Strategy"]
