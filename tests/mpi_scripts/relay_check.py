"""Under mpirun: the progress relay delivers every message of a round inside that round.

usage: mpirun -n W python tests/mpi_scripts/relay_check.py ROUNDS

Each round, every client reports many times (interval 1 ms) with uneven sleeps while the
federator waits in `World.flags` polling the relay through `World.waiting_hook`, as the
round loop does. After the round's collective the federator drains and checks that it
got exactly the messages each client posted (counts from the collective itself), in
order, all of this round, ending with the final one: clients go straight on to the next
round, so a receive that took their next reports would be caught.
Prints "RELAY OK <polled> <drained>" on rank 0; exits 3 on any mismatch.
"""

import sys
import time

import numpy as np

from fedmpi.dist.relay import ProgressRelay
from fedmpi.dist.world import World

world = World()
relay = ProgressRelay(world, interval=0.001)
rounds = int(sys.argv[1])
polled = drained = 0
for r in range(1, rounds + 1):
    if world.is_federator:
        got: dict = {k: [] for k in range(1, world.size)}

        def hook():
            global polled
            for rank, msg in relay.poll():
                got[rank].append(msg.copy())
                polled += 1

        world.waiting_hook = hook
        counts = world.flags([0, 0])
        world.waiting_hook = None
        for rank, msg in relay.drain():
            got[rank].append(msg.copy())
            drained += 1
        for rank in range(1, world.size):
            msgs = np.array(got[rank])
            ok = (
                len(msgs) == counts[rank, 0]
                and (msgs[:, 0] == r).all()
                and (np.diff(msgs[:, 1]) >= 0).all()
                and msgs[-1, 4] == 1
                and msgs[:-1, 4].sum() == 0
                and msgs[-1, 1] == counts[rank, 1]
            )
            if not ok:
                print(
                    f"RELAY MISMATCH round {r} client {rank}: {len(msgs)} messages, "
                    f"{counts[rank].tolist()} posted",
                    flush=True,
                )
                world.abort(3)
    else:
        sent_before = relay.sent
        steps = 40 + 10 * world.rank
        for step in range(steps):
            time.sleep(0.002 * (1 + (step + world.rank) % 3))  # uneven "training"
            relay.report(r, step + 1, steps, (step + 1) * 8)
        relay.finish(r, steps, steps, steps * 8)
        world.flags([relay.sent - sent_before, steps])
        relay.end_round()
if world.is_federator:
    print(f"RELAY OK {polled} {drained}", flush=True)
relay.close()
world.close()
