"""The run folder and its files: the one place that reads and writes them.

Owns `RunFolder` (`runfolder.py`: config.yaml, checkpoints with their COMPLETE markers and
sha256, metrics.jsonl, eval.csv, comm.csv, comm_summary.json, samples/), atomic writes
(`atomic.py`), checkpoint files (`checkpoint.py`: safe loading, background writes) and the
tabular formats (`tables.py`: the one CSV reader and writer, JSONL, the one table formatter).

May import: fedmpi.config, fedmpi.errors.
"""
