"""One DeepSpeed ZeRO rank: forward, loss, backward and step on its shard of a batch; weights out; checkpoints.

A plain class; `learner.group.LearnerGroup` runs K of them as Ray actors (`learner-<rank>`). The loss of a step is
the algorithm's per-token loss reduced with global counts (`StepTotals`), multiplied by the world size because
DeepSpeed averages gradients over ranks: the gradient is then exactly that of one big batch.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from actors.weights import (
    WeightBucket,
    broadcast_buffer,
    group_into_buckets,
    open_weight_group,
    pack_bucket,
    write_shm,
)
from cluster.config import AlgorithmConfig, LearnerConfig, ModelConfig
from cluster.models import model_folder
from learner.algorithms import LossInputs, aggregate, compute_loss, token_entropy, token_logprobs
from learner.batch import MicroBatch, Sample, StepTotals, collate
from learner.ops import build_deepspeed_ops


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def deepspeed_config(cfg: LearnerConfig, lr: float) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,  # the boundary is set explicitly per micro-batch (see train_step)
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": list(cfg.optimizer.betas),
                "eps": cfg.optimizer.eps,
                "weight_decay": cfg.optimizer.weight_decay,
                "torch_adam": True,  # no C++ build of FusedAdam/CPUAdam needed
            },
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": lr,
                "warmup_num_steps": cfg.optimizer.warmup_steps,
            },
        }
        if cfg.optimizer.warmup_steps
        else None,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@dataclass
class MicroBatchLoss:
    per_token: torch.Tensor  # (B, T) the algorithm's masked per-token loss
    metrics: dict[str, torch.Tensor]  # name -> (B, T)
    mask: torch.Tensor  # (B, T)
    behaviour_logprobs: torch.Tensor  # (B, T)


def micro_batch_loss(
    logprobs: torch.Tensor,
    logits: torch.Tensor,
    mb: MicroBatch,
    totals: StepTotals,
    algo: AlgorithmConfig,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MicroBatchLoss]:
    """This micro-batch's share of the step's loss (normalised by the whole step's counts), from the policy's
    logprobs (B, T) and logits (B, T, V). Shared by the DeepSpeed rank and the plain-torch benchmark."""
    device = logprobs.device
    mask = mb.loss_mask.to(device)
    # the entropy is a metric unless it is also a bonus; only then does it need a graph
    entropy = token_entropy(logits if algo.entropy_coef > 0 else logits.detach())
    inputs = LossInputs(
        logprobs=logprobs,
        old_logprobs=logprobs.detach(),  # one update per batch: the proximal policy is the current one
        behaviour_logprobs=mb.behaviour_logprobs.to(device),
        advantages=mb.advantages.to(device),
        mask=mask,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
    )
    out = compute_loss(inputs, algo)
    loss = aggregate(
        out.per_token,
        mask,
        algo.loss_agg,
        total_tokens=totals.total_tokens,
        total_sequences=totals.total_sequences,
        max_tokens=totals.max_tokens,
    )
    return loss, MicroBatchLoss(out.per_token, out.metrics, mask, inputs.behaviour_logprobs)


class LearnerWorker:
    def __init__(
        self,
        rank: int,
        world_size: int,
        model: ModelConfig,
        cfg: LearnerConfig,
        algo: AlgorithmConfig,
        max_tokens: int,
    ):
        torch.set_num_threads(cfg.threads_per_rank)
        self.rank, self.world_size = rank, world_size
        self.model_cfg, self.cfg, self.algo, self.max_tokens = model, cfg, algo, max_tokens
        self.name = f"learner-{rank}"
        self.engine = None
        self.ref_model = None
        self.step = 0

    # -- rendezvous -------------------------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """Rank 0 offers its node address and a free port for the process group."""
        return node_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0" if self.cfg.gpus_per_rank else str(self.rank),
        )
        self.device = torch.device("cuda", 0) if self.cfg.gpus_per_rank else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        build_deepspeed_ops()  # before init_distributed loads it, so a stale build lock cannot hang the rank
        deepspeed.init_distributed(
            dist_backend=self.cfg.backend, timeout=timedelta(seconds=self.cfg.step_timeout_s), verbose=False
        )
        dtype = torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_cfg.path)
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        ds_config = deepspeed_config(self.cfg, self.cfg.optimizer.lr)
        ds_config = {k: v for k, v in ds_config.items() if v is not None}
        if self.cfg.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # While this object lives, from_pretrained builds the model already partitioned (zero.Init).
            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(self.model_cfg.path, dtype=torch.float32)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds_config
        )
        if self.algo.kl_coef > 0:
            self.ref_model = (
                AutoModelForCausalLM.from_pretrained(self.model_cfg.path, dtype=dtype).to(self.device).eval()
            )
            self.ref_model.requires_grad_(False)
        return {
            "rank": self.rank,
            "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()),
        }

    def ready(self) -> str:
        return self.name

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    # -- training ---------------------------------------------------------------------------------------------
    def _forward(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = mb.input_ids.to(self.device)
        attention_mask = mb.attention_mask.to(self.device)
        logits = self.engine(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T, V)
        return token_logprobs(logits, mb.targets.to(self.device)), logits

    def train_step(
        self, micro_batches: list[list[Sample]], totals: StepTotals, loss_name: str | None = None
    ) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches. Returns sums (not means) so the group can reduce
        exactly across ranks: metric sums weighted by tokens, plus token and sequence counts."""
        started = time.perf_counter()
        algo = self.algo if loss_name is None else self.algo.model_copy(update={"loss": loss_name})
        self.engine.train()
        sums: dict[str, float] = {"loss": 0.0, "tokens": 0.0, "sequences": 0.0}
        for i, samples in enumerate(micro_batches):
            mb = collate(samples, self.pad_id)
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            logprobs, logits = self._forward(mb)
            with torch.no_grad():
                ref = self._ref_logprobs(mb) if self.ref_model is not None else None
            loss, out = micro_batch_loss(logprobs, logits, mb, totals, algo, ref_logprobs=ref)
            mask = out.mask
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            sums["loss"] += loss.item()
            sums["tokens"] += mask.sum().item()
            sums["sequences"] += float(len(samples))
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + float((value * mask).sum())
            sums["logprob"] = sums.get("logprob", 0.0) + float((logprobs.detach() * mask).sum())
            sums["engine_logprob_diff"] = sums.get("engine_logprob_diff", 0.0) + float(
                ((logprobs.detach() - out.behaviour_logprobs).abs() * mask).sum()
            )
        self.engine.step()
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        sums["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        sums["lr"] = float(self.engine.optimizer.param_groups[0]["lr"])
        sums["step_s"] = time.perf_counter() - started
        return sums

    def _ref_logprobs(self, mb: MicroBatch) -> torch.Tensor:
        logits = self.ref_model(
            input_ids=mb.input_ids.to(self.device), attention_mask=mb.attention_mask.to(self.device)
        ).logits[:, :-1]
        return token_logprobs(logits, mb.targets.to(self.device))

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Logprob of every token after the first, under the current weights (all ranks must call under ZeRO-3)."""
        self.engine.eval()
        out = []
        for ids in token_ids:
            mb = collate([Sample(ids, 1, [0.0] * (len(ids) - 1), 0.0)], self.pad_id)
            logprobs, _ = self._forward(mb)
            out.append(logprobs[0].float().cpu().tolist())
        return out

    # -- weights out ----------------------------------------------------------------------------------------------
    def _full_parameters(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full (gathered under ZeRO-3) named tensors, one bucket at a time, on CPU. Under ZeRO-3 only the
        current bucket is materialised; every rank must iterate (the gathers are collectives)."""
        import deepspeed

        module = self.engine.module
        named = list(module.named_parameters())
        if self.cfg.zero_stage == 3:
            groups = group_into_buckets(((n, _Sized(p)) for n, p in named), bucket_bytes)
            lookup = dict(named)
            for group in groups:
                params = [lookup[n] for n, _ in group]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    yield [(n, p.detach().to("cpu", copy=True)) for (n, _), p in zip(group, params)]
        else:
            for group in group_into_buckets(named, bucket_bytes):
                yield [(n, p.detach().to("cpu")) for n, p in group]

    def weight_buckets(
        self, version: int, bucket_bytes: int, transport: str = "object_store", shm_dir: str | None = None
    ) -> Iterator[WeightBucket | None]:
        """Streaming generator (a Ray generator method): rank 0 yields one bucket per group of modules, other
        ranks only join the ZeRO-3 gathers and yield None. object_store: the bucket with its bytes; shm: a
        descriptor of a file in /dev/shm; torch_dist: a descriptor, then rank 0 broadcasts the bytes to the
        engines, which receive as they load that bucket."""
        for i, named in enumerate(self._full_parameters(bucket_bytes)):
            if self.rank != 0:
                yield None
                continue
            bucket = pack_bucket(version, i, named)
            if transport == "object_store":
                yield bucket
            elif transport == "shm":
                yield write_shm(bucket, shm_dir)
            else:
                yield bucket.descriptor("torch_dist")
                buffer = torch.from_numpy(bucket.flat())
                broadcast_buffer(
                    self.weight_group, buffer.to(self.device) if self.device.type == "cuda" else buffer
                )

    def open_weight_group(self, port: int, world_size: int, timeout_s: float) -> None:
        """Rank 0 joins (and hosts) the process group it shares with the engines for the torch_dist transport."""
        self.weight_group = open_weight_group(
            node_address(), port, 0, world_size, timeout_s, self.cfg.backend
        )

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def state_dict_cpu(self) -> dict[str, torch.Tensor] | None:
        state = {}
        for named in self._full_parameters(256 * 2**20):
            if self.rank == 0:
                state.update(named)
        return state if self.rank == 0 else None

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> str:
        self.engine.save_checkpoint(
            directory, tag=tag, client_state={**client_state, "learner_step": self.step}
        )
        return tag

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any]:
        _, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if client_state is None:
            raise FileNotFoundError(f"{self.name}: no checkpoint {tag!r} in {directory}")
        self.step = int(client_state.get("learner_step", 0))
        return client_state

    def export_hf(self, directory: str) -> str | None:
        """Write the current weights as a Hugging Face folder (safetensors + tokenizer); rank 0 writes."""
        state = self.state_dict_cpu()
        if self.rank != 0:
            return None
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.model_cfg.path)
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config)
        with model_folder(Path(directory)) as staging:  # a cut export never looks complete
            shell.save_pretrained(staging, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
        return directory

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class _Sized:
    """Stands in for a ZeRO-3 partitioned parameter when sizing buckets (its full numel is ds_numel)."""

    def __init__(self, p: torch.Tensor):
        self._numel = getattr(p, "ds_numel", p.numel())
        self._itemsize = p.element_size()

    def numel(self) -> int:
        return self._numel

    def element_size(self) -> int:
        return self._itemsize
