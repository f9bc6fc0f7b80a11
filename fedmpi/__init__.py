"""fedmpi: federated DDPM training over MPI that shares only parts of the UNet.

Layout (imports only point down this list):
  config      YAML + dataclass schema, dotted overrides
  unet        the region-named UNet; regions: region membership and flat buffers
  diffusion   DDPM / DDIM with the schedule outside the network
  data, partition   datasets, HDF5 client shards, deterministic client splits
  methods     FULL / USPLIT / UDEC / ULATDEC plans and FedAvg (pure)
  ledger      byte ledger and the analytical communication table
  comm        the only MPI / torch.distributed code: world, subgroups, backends
  trainer     the local training loop (centralized baseline and clients)
  fid, extractors, evaluate   feature statistics, Frechet distances, distributed scoring
  checkpoint, metrics         run folders, atomic checkpoints, metric files
  federated   the round loop of the federator and the clients
  train       entry point: centralized (one process) or federated (under mpirun)
"""

__version__ = "0.1.0"
