"""How updates cross the wire. The only package that calls torch.distributed collectives."""

from scaling_fl.exchange.collectives import (
    broadcast_flat_,
    broadcast_int,
    gather_from_sites,
    sum_across_sites,
    wait_for_all_sites,
)
from scaling_fl.exchange.dense import DenseExchange, bucket_ranges

__all__ = ["DenseExchange", "broadcast_flat_", "broadcast_int", "bucket_ranges", "gather_from_sites", "sum_across_sites",
           "wait_for_all_sites"]
