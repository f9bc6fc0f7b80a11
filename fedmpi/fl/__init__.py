"""Federated learning proper: who sends what, and how it is averaged and counted.

- `methods.py`: FULL / USPLIT / UDEC / ULATDEC as pure per-round plans, FedAvg weights.
- `aggregate.py`: the round's driver (`Aggregator`): the initial broadcast and the
  per-region exchange (subgroups, Reduce, Bcast, the finiteness check, the ledger), and
  the choice of strategy from the config.
- `strategy.py`: the one interface of what happens to an upload at the Reduce and to
  the sum (`AggregationStrategy`), a rank's buffers, plain FedAvg (`PlainFedAvg`).
- `secure.py`: secure aggregation (`SecureFedAvg`, the client's `SecureAggregator`, the
  set-up check), built on `fixedpoint.py` (uint64 fixed-point encoding, overflow,
  decoding) and `masks.py` (X25519 key agreement, AES-CTR pairwise mask streams).
- `compress.py`: compressed uploads (`CompressedFedAvg`: bf16, int8, top-k updates with
  error feedback; int8 also under secure aggregation's masks).
- `privacy.py`: differential privacy (clipping, noise, the accountant) and its strategy
  (`DifferentialPrivacy`, a wrapper around plain or secure FedAvg).
- `ledger.py`: the byte ledger (every transfer, and the analytical table it must match).

May import: fedmpi.model, fedmpi.dist, fedmpi.config, fedmpi.errors, fedmpi.runtime.
"""
