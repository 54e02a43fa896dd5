"""Input-distribution overlap on 2 gloo processes: steps/s of the same sharded MMoE, batch and data.

    python tools/bench_input_dist.py --data DIR --variant VARIANT [--steps 60 --warmup 10 --batch-size 2048]

Variants: ``lightning``: ``Trainer.fit`` under ``TorchRecStrategy``; ``torchrec-base``: a plain
loop over the same sharded model (no overlap; it also reports the wall time of each step's input
distribution, the most an overlap could hide); ``torchrec-sparse-dist``: TorchRec's
``TrainPipelineSparseDist`` (each batch's input all-to-all started one batch ahead). ``DIR`` as
for ``tools/bench_train.py``. Prints one JSON line (rank 0): steps/s over the steps after warmup,
and each process's CPU time per step (all its threads), less sensitive to a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardedModule, ShardingEnv

from lightning_mtr.benchmarks.train import SETUPS, schema_from_data
from lightning_mtr.data.datamodule import MultiTaskDataModule
from lightning_mtr.models import MODELS
from lightning_mtr.embeddings import SparseOptimizer, init_tables
from lightning_mtr.training.distributed.sharding import SHARDED, prepare_for_sharding, sharders
from lightning_mtr.nn.meta import materialize
from lightning_mtr.training import MultiTaskModule
from lightning_mtr.training.distributed import TorchRecStrategy
from lightning_mtr.training.distributed.planning import Cluster, plan_model
from lightning_mtr.training.distributed.strategy import sharded_state_names

VARIANTS = ("lightning", "torchrec-base", "torchrec-sparse-dist")
WORLD = 2


def _parts(args, rank: int):
    setup = SETUPS["mmoe"]
    schema_path = Path(args.workdir) / "schema.yaml"
    if rank == 0 and not schema_path.exists():
        schema_path.write_text(yaml.safe_dump(schema_from_data(Path(args.data) / "train.parquet", setup.tasks)))
    while not schema_path.exists():
        time.sleep(0.1)
    data = MultiTaskDataModule(str(schema_path), train=str(Path(args.data) / "train.parquet"),
                               batch_size=args.batch_size, shuffle_buffer=16384, seed=0)
    module = MultiTaskModule(model=lambda schema: MODELS["mmoe"](schema, **setup.kwargs), schema=data.schema,
                             dense_optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
                             sparse_optimizer=SparseOptimizer("rowwise_adagrad", lr=0.05))
    return data, module


def _clocks() -> tuple[float, float]:
    """(wall, this process's CPU time over all its threads, gloo's included)."""
    return time.perf_counter(), time.process_time()


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = _clocks()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = _clocks()


def _lightning(rank: int, args) -> dict:
    data, module = _parts(args, rank)
    timer = _Timer(args.warmup)
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, inference_mode=False,
                        strategy=TorchRecStrategy(),
                        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
                        default_root_dir=args.workdir)
    trainer.fit(module, datamodule=data)
    return {"clocks": (timer.start, timer.end)}


class _Loss(nn.Module):
    """The training step's loss (the module's own losses, summed), as DDP's forward."""

    def __init__(self, module: MultiTaskModule):
        super().__init__()
        self.module = module

    def forward(self, batch):
        _, losses, extra = self.module.outputs_and_losses(batch)
        return sum(losses.values()) + sum(extra.values())


class _Lookups(nn.Module):
    """What ``TrainPipelineSparseDist`` traces: the sharded collections fed ``batch.sparse``
    (our models branch on the lookup's key order, which FX cannot trace); training runs the
    real model, whose calls of these collections the pipeline has rewritten."""

    def __init__(self, collections: list[nn.Module]):
        super().__init__()
        self.collections = nn.ModuleList(collections)

    def forward(self, batch):
        return [collection(batch.sparse) for collection in self.collections]


class _Optimizers:
    def __init__(self, *optimizers):
        self.optimizers = [o for o in optimizers if o is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def _torchrec(rank: int, args) -> dict:
    data, module = _parts(args, rank)
    device = torch.device("cpu")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    data.trainer = SimpleNamespace(global_rank=rank, world_size=WORLD, strategy=SimpleNamespace(root_device=device),
                                   fit_loop=SimpleNamespace(epoch_progress=SimpleNamespace(
                                       current=SimpleNamespace(processed=0))))
    materialize(module.model, device)
    prepare_for_sharding(module.model, module.sparse_optimizer)
    plan, _ = plan_model(module.model, Cluster(world_size=WORLD, local_world_size=WORLD, device="cpu"),
                         args.batch_size, {}, dist.GroupMember.WORLD)
    DistributedModelParallel(module.model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=device,
                             plan=plan, sharders=sharders(), init_data_parallel=False, init_parameters=False)
    init_tables(module.model, device, SHARDED)
    loss = _Loss(module)
    ignored = set(sharded_state_names(loss))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss, list(ignored))
    ddp = DistributedDataParallel(loss)
    dense = [p for n, p in loss.named_parameters() if n not in ignored and p.requires_grad]
    optimizer = _Optimizers(torch.optim.Adam(dense, lr=1e-3),
                            TorchRecStrategy._table_optimizer(module.model, module.sparse_optimizer))
    if args.variant == "torchrec-sparse-dist":
        lookups = _Lookups([m for m in module.model.modules() if isinstance(m, ShardedModule)])
        pipeline = TrainPipelineSparseDist(lookups, optimizer, device, custom_model_fwd=lambda b: (ddp(b), None))
    else:
        pipeline = _Plain(ddp, optimizer)
        for collection in (m for m in module.model.modules() if isinstance(m, ShardedModule)):
            collection.forward = _TimedForward(collection, pipeline.input_dist_seconds)
    batches = iter(data.train_dataloader())
    for index in range(args.steps):
        if index == args.warmup:
            start = _clocks()
        pipeline.progress(batches)
    pipelined = len(getattr(pipeline, "_pipelined_modules", []))
    waited = getattr(pipeline, "input_dist_seconds", [])[args.warmup:]
    return {"clocks": (start, _clocks()), "pipelined_modules": pipelined,
            **({"input_dist_ms_per_step": round(1000 * sum(waited) / len(waited), 2)} if waited else {})}


class _TimedForward:
    """``ShardedModule.forward`` (input dist, then compute and output dist) that records how long
    the input distribution took, start to wait, in wall time."""

    def __init__(self, module: ShardedModule, seconds: list[float]):
        self.module, self.seconds = module, seconds

    def __call__(self, features):
        context = self.module.create_context()
        start = time.perf_counter()
        distributed = self.module.input_dist(context, features).wait().wait()
        self.seconds.append(time.perf_counter() - start)
        return self.module.compute_and_output_dist(context, distributed)


class _Plain:
    """One step at a time, as ``TrainPipelineBase`` does on CPU (which calls the model itself,
    without a custom forward): each batch's input distribution starts when its forward does."""

    def __init__(self, model: nn.Module, optimizer: _Optimizers):
        self.model, self.optimizer = model, optimizer
        self.input_dist_seconds: list[float] = []  # per step: the most an overlap could hide

    def progress(self, batches) -> None:
        self.optimizer.zero_grad()
        self.model(next(batches)).backward()
        self.optimizer.step()


def _rank(rank: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), NODE_RANK="0")
    torch.set_num_threads(1)
    result = (_lightning if args.variant == "lightning" else _torchrec)(rank, args)
    (wall, cpu), (wall_end, cpu_end) = result.pop("clocks")
    cpus = [None] * WORLD
    dist.all_gather_object(cpus, cpu_end - cpu)
    if rank == 0:
        steps = args.steps - args.warmup
        print(json.dumps({"variant": args.variant, "batch_size": args.batch_size, "timed_steps": steps,
                          "steps_per_s": round(steps / (wall_end - wall), 3),
                          "cpu_ms_per_step": [round(1000 * c / steps, 1) for c in cpus], **result}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_input_dist_") as workdir, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        args.workdir = workdir
        mp.spawn(_rank, args=(port, args), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
