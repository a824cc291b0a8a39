"""PyTorch DistributedDataParallel, unchanged from what `torchrun` would run.

Kiln sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and LOCAL_RANK on every process, so
`init_process_group` with the default `env://` rendezvous just works. It uses NCCL when the
process has a GPU and gloo otherwise (so it runs on CPU-only agents too):

    kiln submit --target gpu --nodes 2 --procs-per-node 8 --gpus-per-node 8 examples/distributed ddp_train.py
    kiln submit --target cpu --nodes 2 --procs-per-node 2 examples/distributed ddp_train.py

Needs `torch` in the agent's Python environment.
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import kiln

use_cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if use_cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
local_rank = int(os.environ["LOCAL_RANK"])
device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")  # CUDA_VISIBLE_DEVICES maps the local rank's GPU to 0

torch.manual_seed(0)
model = DDP(torch.nn.Linear(32, 1).to(device), device_ids=[0] if use_cuda else None)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

# Each rank trains on its own shard of a synthetic regression problem.
generator = torch.Generator().manual_seed(rank)
true_w = torch.arange(32, dtype=torch.float32).unsqueeze(1) / 32
for step in range(200):
    x = torch.randn(64, 32, generator=generator).to(device)
    y = x @ true_w.to(device)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()  # DDP all-reduces the gradients across every rank here
    optimizer.step()
    if step % 20 == 0:
        kiln.log("loss", loss.item(), step=step)
        if rank == 0:
            print("step %d loss %.4f (world %d)" % (step, loss.item(), world), flush=True)

# Every rank ends with the same weights: check it with one more all-reduce.
weights = torch.cat([p.detach().flatten() for p in model.parameters()])
mean = weights.clone()
dist.all_reduce(mean)
mean /= world
assert torch.allclose(weights, mean), "ranks diverged"
if rank == 0:
    print("done: %d ranks agree on the weights" % world, flush=True)
dist.destroy_process_group()
