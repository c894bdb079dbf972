"""A bare PyTorch DDP loop: the reference `train_throughput.py` compares `distgen train` with.

Same U-Net preset, noise schedule, loss, optimizer, data loader and process
count; nothing else (no EMA, logging, checkpoints or checks). Run under
torchrun; prints `bare: <samples/s>` on rank 0.
"""

import os
import sys
import time

import torch
import torch.distributed as td
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from distgen.config import DataConfig
from distgen.data import make_loader
from distgen.config.backbones import UNET_PRESETS as PRESETS

manifest, preset, batch, steps, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
world = int(os.environ.get("WORLD_SIZE", 1))
rank = int(os.environ.get("RANK", 0))
if world > 1:
    td.init_process_group("gloo")
torch.manual_seed(0)
net = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, **PRESETS[preset])
model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
sched = DDPMScheduler(num_train_timesteps=1000)
loader = make_loader(manifest, DataConfig(resolution=28, channels=1, workers=1, shuffle_buffer=500),
                     batch_size=batch, mode="train", rank=rank, world=world)
it = iter(loader)
for step in range(warmup + steps):
    if step == warmup:
        t0 = time.perf_counter()
    x0 = next(it)["image"]
    t = torch.randint(0, 1000, (x0.shape[0],))
    noise = torch.randn_like(x0)
    loss = F.mse_loss(model(sched.add_noise(x0, noise, t), t).sample, noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
dt = time.perf_counter() - t0
if rank == 0:
    print(f"bare: {steps * batch * world / dt:.2f}")
