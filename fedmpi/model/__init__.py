"""The network and the diffusion process: what is trained and what is communicated.

Owns the UNet (`unet.py`: its top-level children encoder / bottleneck / decoder are the
regions the methods share), the regions (`regions.py`: which parameters belong to which
region, one flat float32 buffer per region so a collective moves it in one call), the DDPM
(`diffusion.py`: schedule in float64 outside the network, loss, DDPM and DDIM samplers) and
the model's shape and region sizes for a config (`summary.py`).

May import: fedmpi.config, fedmpi.errors, fedmpi.runtime.
"""
