"""What is done with the sample-weighted mean update. Pure tensor math, no I/O, no collectives."""

from scaling_fl.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from scaling_fl.strategies.base import Strategy
from scaling_fl.strategies.factory import STRATEGIES, STRATEGY_DEFAULTS, make_strategy, strategy_hyperparameters
from scaling_fl.strategies.fedavg import FedAvg
from scaling_fl.strategies.fedavgm import FedAvgM
from scaling_fl.strategies.scaffold import Scaffold

__all__ = [
    "STRATEGIES",
    "STRATEGY_DEFAULTS",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "Scaffold",
    "Strategy",
    "make_strategy",
    "strategy_hyperparameters",
]
