"""What is done with the sample-weighted mean update. Pure tensor math, no I/O, no collectives."""

from scaling_fl.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from scaling_fl.strategies.base import Strategy
from scaling_fl.strategies.factory import STRATEGIES, STRATEGY_DEFAULTS, make_strategy, strategy_hyperparameters
from scaling_fl.strategies.fedavg import FedAvg
from scaling_fl.strategies.fedavgm import FedAvgM

__all__ = [
    "STRATEGIES",
    "STRATEGY_DEFAULTS",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "Strategy",
    "make_strategy",
    "strategy_hyperparameters",
]
