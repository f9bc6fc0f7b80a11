"""The processes: ranks, subgroups and collectives. The ONLY package that imports mpi4py or
torch.distributed.

Owns `World` (rank 0 the federator, ranks 1..K the clients; node-local rank and device;
one subgroup per set of reporters, cached; Reduce / Bcast of flat buffers; small object
collectives with a stall timeout; abort) with its two backends (`backends.py`: MPI
`Comm.Split` and torch.distributed with NCCL or gloo), and the progress relay
(`relay.py`: clients' non-blocking progress messages to the federator).

May import: fedmpi.config, fedmpi.errors, fedmpi.runtime.
"""
