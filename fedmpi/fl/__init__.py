"""Federated learning proper: who sends what, and how it is averaged and counted.

Owns the methods (`methods.py`: FULL / USPLIT / UDEC / ULATDEC as pure per-round plans and
FedAvg weights), aggregation (`aggregate.py`: the initial broadcast and the per-region
exchange; the strategies plain, secure and DP behind one interface), secure aggregation
(`secure.py`: pairwise masks, fixed point), differential privacy (`privacy.py`: clipping,
noise, the accountant) and the byte ledger (`ledger.py`: every transfer, and the analytical
table it must match).

May import: fedmpi.model, fedmpi.dist, fedmpi.config, fedmpi.errors, fedmpi.runtime.
"""
