"""A standard-library all-reduce across every rank of a Kiln distributed run.

It reads only the variables torchrun would set (MASTER_ADDR, MASTER_PORT, WORLD_SIZE,
RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK) plus KILN_NODES, rendezvouses over TCP on
MASTER_ADDR:MASTER_PORT, sums (RANK + 1) over all ranks and checks the result. Rank 0 also
checks that every rank is unique and that the ranks agree about the world.

    kiln submit --target cpu --nodes 3 --procs-per-node 2 examples/distributed allreduce.py
"""

import json
import os
import socket
import sys
import time

import kiln

env = os.environ
rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
local, per_node = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
node = int(env["NODE_RANK"])
nodes = env["KILN_NODES"].split(",")
master = (env["MASTER_ADDR"], int(env["MASTER_PORT"]))

assert rank == node * per_node + local, (rank, node, per_node, local)
assert world == len(nodes) * per_node, (world, nodes, per_node)
assert master[0] == nodes[0], (master, nodes)
print("rank %d of %d: node %d (%s), local rank %d, pid %d" % (rank, world, node, nodes[node], local, os.getpid()), flush=True)


def send(conn, message):
    conn.sendall((json.dumps(message) + "\n").encode())


if rank == 0:
    server = socket.create_server(master)
    server.settimeout(60)
    peers, seen = [], {0: (node, local)}
    total = rank + 1
    while len(peers) < world - 1:
        conn, (peer_ip, _) = server.accept()
        reader = conn.makefile()
        hello = json.loads(reader.readline())
        other = hello["rank"]
        assert other not in seen, "rank %d twice" % other
        assert (hello["node"], hello["local"]) not in seen.values(), hello
        assert hello["world"] == world and hello["master"] == list(master), hello
        # Each rank connects from its own node's address.
        assert peer_ip == nodes[hello["node"]], (peer_ip, hello)
        seen[other] = (hello["node"], hello["local"])
        total += hello["value"]
        peers.append(conn)
    assert sorted(seen) == list(range(world)), seen
    for conn in peers:
        send(conn, {"sum": total})
    result = total
else:
    deadline = time.time() + 60
    while True:
        try:
            conn = socket.create_connection(master, timeout=60, source_address=(nodes[node], 0))
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    send(conn, {"rank": rank, "node": node, "local": local, "world": world,
                "master": list(master), "value": rank + 1})
    result = json.loads(conn.makefile().readline())["sum"]

expected = world * (world + 1) // 2
if result != expected:
    print("rank %d: all-reduce gave %d, expected %d" % (rank, result, expected), file=sys.stderr)
    sys.exit(1)
kiln.log("allreduce", result)
kiln.log("rank", rank)
print("rank %d: all-reduce sum %d ok" % (rank, result), flush=True)
