"""Training: the local trainer and the one round loop.

Owns `LocalTrainer` (`trainer.py`: E epochs or N steps of DDPM training, precision, compile,
EMA, LR schedule), the round loop (`loop.py`: set-up, rounds, flags, aggregation, evaluation,
checkpoints, resume; the centralized baseline is K = 1 through the same loop), stopping
(`stop.py`: preemption signals and the job's stop exceptions) and the progress display
(`progress.py`). `python -m fedmpi.train` runs fedmpi.cli.train.

May import: every package above it (config, model, data, dist, fl, store, eval).
"""
