"""How updates cross the wire. The only package that calls torch.distributed collectives.

dense.py     the sample-weighted mean through bounded flat buckets (the default)
sparse.py    top-k of each site's update (+ int8 values), per-position averaging, error feedback
quantize.py  blockwise absmax int8 of the update, decoded before summing
packed.py    a process hosting many sites: each site encoded as if alone, the processes' sums all_reduced
gathered.py  robust aggregation: every participant's update gathered bucket by bucket, reduced by a rule
dynamic.py   when to synchronize: every round, every comm_period steps, or dynamically
factory.py   exchange= name -> exchange object
collectives.py  the small ones: start-up broadcast, metric sums
"""

from scaling_fl.exchange.collectives import (
    broadcast_flat_,
    broadcast_int,
    broadcast_state_,
    gather_from_sites,
    max_across_sites,
    sum_across_sites,
    wait_for_all_sites,
)
from scaling_fl.exchange.dense import DenseExchange, bucket_ranges
from scaling_fl.exchange.dynamic import SYNC_MODES, SyncPolicy, make_sync_policy
from scaling_fl.exchange.factory import EXCHANGES, make_exchange
from scaling_fl.exchange.gathered import GatheredExchange
from scaling_fl.exchange.packed import PackedExchange
from scaling_fl.exchange.sparse import CRITERIA, SCOPES, SPARSE_AVERAGES, segments_from_model

__all__ = [
    "CRITERIA",
    "DenseExchange",
    "EXCHANGES",
    "GatheredExchange",
    "PackedExchange",
    "SCOPES",
    "SPARSE_AVERAGES",
    "SYNC_MODES",
    "SyncPolicy",
    "broadcast_flat_",
    "broadcast_int",
    "broadcast_state_",
    "bucket_ranges",
    "gather_from_sites",
    "max_across_sites",
    "make_exchange",
    "make_sync_policy",
    "segments_from_model",
    "sum_across_sites",
    "wait_for_all_sites",
]
