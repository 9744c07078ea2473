"""One DeepSpeed ZeRO rank: forward, loss, backward and step on its shard of a batch; weights out; checkpoints.

A plain class; `aha.learner.group.LearnerGroup` runs K of them as Ray actors (`learner-<rank>`). The loss of a step is
the algorithm's per-token loss reduced with global counts (`StepTotals`), multiplied by the world size because
DeepSpeed averages gradients over ranks: the gradient is then exactly that of one big batch.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from aha.actors.config import ModelConfig, SamplingConfig
from aha.actors.weights import (
    WeightBucket,
    broadcast_buffer,
    close_weight_group,
    group_into_buckets,
    open_weight_group,
    pack_bucket,
    pack_flat,
    transport_device,
    write_shm,
)
from aha.learner.algorithms import approx_kl, sampling_logits
from aha.learner.batch import MicroBatch, Sample, StepTotals, collate
from aha.learner.config import AlgorithmConfig, LearnerConfig
from aha.learner.dropout import train_mode
from aha.learner.files import model_folder
from aha.learner.lora import MergedWeight, add_adapters, merged_parameters, trainable_parameters
from aha.learner.micro_batch import (
    add_pass_metrics,
    add_proximal_metrics,
    micro_batch_loss,
    training_batch,
)
from aha.learner.ops import build_deepspeed_ops
from aha.learner.prompt_sharing import read_cache_under_checkpointing, shared_prompt_logits
from aha.learner.token_stats import token_stats

Processing = Literal["sampled", "tempered", "raw"]
"""How the learner turns logits into logprobs (`LearnerWorker._forward`)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def clips_itself(cfg: LearnerConfig) -> bool:
    """Whether the worker clips the gradient, not DeepSpeed: without ZeRO in fp32, DeepSpeed clips but never
    reports the norm (its bf16 and ZeRO optimizers do)."""
    return cfg.zero_stage == 0 and cfg.dtype != "bfloat16"  # as deepspeed_config and setup read the dtype


def deepspeed_config(cfg: LearnerConfig, lr: float) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,  # the boundary is set explicitly per micro-batch (see train_step)
        "gradient_clipping": 0.0 if clips_itself(cfg) else cfg.grad_clip,
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
                # torch's one-kernel AdamW (CPU and CUDA): the default foreach version allocates temporaries the
                # size of every parameter, several times slower per step (bench/README.md, "vs_trl.py")
                "fused": True,
            },
        },
        # no DeepSpeed scheduler: it would set the lr at every step and override imitation's (see warmup_lr)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def warmup_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """The learning rate of a phase's `step`-th optimizer step (0-based): linear warm-up from base_lr /
    warmup_steps to base_lr over the first warmup_steps steps, then base_lr. Imitation and trial and error each
    warm up from their own start, each to its own base lr."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


class LearnerWorker:
    def __init__(
        self,
        rank: int,
        world_size: int,
        model: ModelConfig,
        cfg: LearnerConfig,
        algo: AlgorithmConfig,
        sampling: SamplingConfig,
    ):
        torch.set_num_threads(cfg.threads_per_rank)
        self.rank, self.world_size = rank, world_size
        self.model_cfg, self.cfg, self.algo, self.sampling = model, cfg, algo, sampling
        self.name = f"learner-{rank}"
        self.engine = None
        self.ref_model = None
        self.weight_group = None  # torch_dist: the process group with the engines (rank 0)
        self.weight_device = torch.device("cpu")  # of the torch_dist buffers; set with the weight group
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
        # Ray's CUDA_VISIBLE_DEVICES shows this actor its own GPU only: it is cuda:0, hence LOCAL_RANK 0 above
        self.device = torch.device("cuda", 0) if self.cfg.gpus_per_rank else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:  # the CPU backend's comm op; built before init_distributed loads it (a stale lock cannot hang)
            build_deepspeed_ops()
        deepspeed.init_distributed(
            dist_backend=self.cfg.backend, timeout=timedelta(seconds=self.cfg.step_timeout_s), verbose=False
        )
        self.dtype = dtype = torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_cfg.path)
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        ds_config = deepspeed_config(self.cfg, self.cfg.optimizer.lr)
        ds_config = {k: v for k, v in ds_config.items() if v is not None}
        if self.algo.kl_coef > 0 and self.cfg.lora is None:  # with LoRA the reference is the frozen base
            # Before the HF DeepSpeed config below exists: while it lives, from_pretrained builds every model
            # partitioned by ZeRO-3, and the frozen reference has no engine that would gather it.
            self.ref_model = self._reference_model(dtype)
        if self.cfg.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # While this object lives, from_pretrained builds the model already partitioned (zero.Init).
            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(self.model_cfg.path, dtype=torch.float32)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            read_cache_under_checkpointing(model)  # the shared-prompt layout's idempotent caches
        model.config.use_cache = False
        if self.cfg.lora is not None:
            model = add_adapters(model, self.cfg.lora)
        trainable = trainable_parameters(model)  # the optimizer's: every weight, or only the adapters
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
        return {
            "rank": self.rank,
            "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()),
            "trainable_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable),
        }

    def _reference_model(self, dtype: torch.dtype):
        """The frozen reference policy of the KL penalty: a whole (never partitioned) copy on this rank."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_cfg.path, dtype=dtype).to(self.device).eval()
        model.requires_grad_(False)
        return model

    @torch.no_grad()
    def snapshot_reference(self) -> None:
        """The KL reference becomes a frozen copy of the current weights (adapters merged in, with LoRA): the
        model trial and error starts from. Every rank calls it (under ZeRO-3 the weights are gathered in
        collectives) and ends with the same whole copy."""
        if self.ref_model is None:  # LoRA: the frozen base was the reference until now
            with _without_hf_zero3():
                self.ref_model = self._reference_model(self.dtype)
        params = dict(self.ref_model.named_parameters())
        copied = set()
        for named in self._full_parameters(256 * 2**20, self.device, every_rank=True):
            for name, value in named:
                params[name].copy_(value)
                copied.add(name)
        if copied != set(params):
            raise RuntimeError(
                f"{self.name}: the reference snapshot missed {sorted(set(params) - copied)[:5]}"
            )

    def save_reference(self, path: str) -> str | None:
        """Rank 0 writes the reference's weights to `path` (safetensors, replaced whole) for a resumed run."""
        if self.rank != 0 or self.ref_model is None:
            return None
        from safetensors.torch import save_file

        tensors = {n: p.detach().cpu().contiguous() for n, p in self.ref_model.named_parameters()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        staging = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, staging)
        os.replace(staging, path)  # a cut write never looks like a reference
        return path

    @torch.no_grad()
    def load_reference(self, path: str) -> None:
        """The reference `save_reference` wrote (every rank reads it)."""
        from safetensors.torch import load_file

        if self.ref_model is None:
            with _without_hf_zero3():
                self.ref_model = self._reference_model(self.dtype)
        params = dict(self.ref_model.named_parameters())
        saved = load_file(path)
        if set(saved) != set(params):
            raise ValueError(f"{path} does not hold this model's weights (names differ)")
        for name, value in saved.items():
            params[name].copy_(value)

    def ready(self) -> str:
        return self.name

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    # -- training ---------------------------------------------------------------------------------------------
    def _forward(
        self, mb: MicroBatch, processing: Processing, model=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logprobs (B, T) of the targets and the entropy (B, T) of the distribution they come from, T =
        mb.targets' width, in float32 chunks of positions (`token_stats`). Plain layout: the model's last T + 1
        positions are projected to logits (the prompt positions a `completion_window` cut off never reach the
        lm_head); shared-prompt layout: `shared_prompt_logits`. processing: "sampled", of the distribution the
        engines sample from (temperature, top-k, top-p: `sampling_logits`); "tempered", temperature only (the KL
        reference); "raw", the model's own softmax. The entropy has a gradient only for an entropy bonus."""
        model = self.engine if model is None else model
        if mb.prompt_ids is not None:  # each distinct prompt once, completions against its cache
            logits = shared_prompt_logits(model, mb, self.device)
        else:
            input_ids = mb.input_ids.to(self.device)  # (B, L)
            attention_mask = mb.attention_mask.to(self.device)
            keep = mb.targets.shape[1] + 1
            out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep)
            logits = out.logits[:, :-1]  # (B, T, V): the last position predicts past the sequence
        s = self.sampling
        process = {
            "sampled": partial(sampling_logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p),
            "tempered": partial(sampling_logits, temperature=s.temperature),
            "raw": lambda x: x,
        }[processing]
        return token_stats(
            logits, mb.targets.to(self.device), process, entropy_grad=self.algo.entropy_coef > 0
        )

    @torch.no_grad()
    def _logprobs(self, mb: MicroBatch, processing: Processing, model=None) -> torch.Tensor:
        return self._forward(mb, processing, model)[0]

    def train_step(
        self,
        updates: list[list[list[Sample]]],
        totals: list[StepTotals],
        lr: float,
        phase_step: int,
        loss_name: str | None = None,
        epochs: int = 1,
        shared: bool = False,
    ) -> dict[str, Any]:
        """One training step: `epochs` passes over this rank's mini-batches (`updates`: mini-batch ->
        micro-batches -> samples; `totals[u]` the counts of mini-batch u over all ranks), one optimizer step per
        mini-batch; `shared`: in the shared-prompt layout (the group decides, the same on every rank). With more
        than one update, the proximal logprobs of every sample are computed first, without gradient, and anchor
        every update; afterwards KL(proximal || new) is measured on the same tokens.

        Returns sums (not means) so the group can reduce exactly across ranks: token metrics summed over every
        pass ("token_passes" counts their tokens), engine/learner agreement over the proximal logprobs ("tokens"
        counts each token once), ratio extremes, and one record per optimizer step (loss share, grad norm, lr)."""
        started = time.perf_counter()
        algo = self.algo if loss_name is None else self.algo.model_copy(update={"loss": loss_name})
        imitation = algo.loss == "sft"
        policy: Processing = "raw" if imitation else "sampled"  # imitation fits the model's own distribution
        batches = [  # collated once
            [training_batch(samples, self.pad_id, shared) for samples in mbs] for mbs in updates
        ]
        several = epochs * len(batches) > 1
        # one mode for every pass of the step (the first update's ratio is then exactly 1): trial and error
        # without dropout, imitation with the model's own (learner/dropout.py)
        train_mode(self.engine, dropout=imitation)
        if several:  # the proximal policy: this step's starting weights
            old = [[self._logprobs(mb, policy) for mb in mbs] for mbs in batches]
        # the KL reference: never in imitation, whose loss has no penalty
        refs = [[None if imitation else self._ref_logprobs(mb) for mb in mbs] for mbs in batches]
        sums: dict[str, Any] = {"tokens": 0.0, "sequences": 0.0, "token_passes": 0.0}
        sums.update(ratio_min=float("inf"), ratio_max=float("-inf"), logprob=0.0, engine_logprob_diff=0.0)
        records = []
        for epoch in range(epochs):
            for u, mbs in enumerate(batches):
                self._set_lr(warmup_lr(lr, phase_step + len(records), self.cfg.optimizer.warmup_steps))
                update_loss = 0.0
                for i, mb in enumerate(mbs):
                    self.engine.set_gradient_accumulation_boundary(i == len(mbs) - 1)
                    logprobs, entropy = self._forward(mb, policy)
                    proximal = old[u][i] if several else None
                    loss, out = micro_batch_loss(
                        logprobs, entropy, mb, totals[u], algo, ref_logprobs=refs[u][i], old_logprobs=proximal
                    )
                    self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                    update_loss += loss.item()
                    add_pass_metrics(sums, out)
                    if epoch == 0:  # once per sample: the proximal policy against the engine's
                        add_proximal_metrics(sums, logprobs.detach() if proximal is None else proximal, out)
                        sums["sequences"] += float(len(updates[u][i]))
                own_norm = (  # after the last backward: the gradients are already all-reduced
                    torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(), self.cfg.grad_clip)
                    if clips_itself(self.cfg)
                    else None
                )
                self.engine.step()
                grad_norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
                records.append(
                    {
                        "loss": update_loss,
                        "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                        "lr": float(self.engine.optimizer.param_groups[0]["lr"]),
                    }
                )
        if several:  # how far this step moved the policy, on the tokens it trained on
            kl = 0.0
            for olds, mbs in zip(old, batches):
                for o, mb in zip(olds, mbs):
                    mask = mb.loss_mask.to(self.device)
                    kl_old_new = approx_kl(o, self._logprobs(mb, policy), "k3", mask)  # samples came from old
                    kl += float((kl_old_new * mask).sum())
            sums["policy_kl"] = kl
        self.step += 1
        sums["updates"] = records
        sums["step_s"] = time.perf_counter() - started
        return sums

    def _ref_logprobs(self, mb: MicroBatch) -> torch.Tensor | None:
        """The reference's logprobs under the temperature alone, as TRL takes them: a top-k / top-p truncated
        reference would give a sampled token outside its own nucleus probability 0 (and the KL estimate ~1e9).
        None without a KL penalty."""
        if self.algo.kl_coef == 0:
            return None
        if self.ref_model is not None:
            return self._logprobs(mb, "tempered", self.ref_model)
        # LoRA before any snapshot: the frozen base is the reference
        with self.engine.module.disable_adapter():
            return self._logprobs(mb, "tempered")

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Logprob of every token after the first, under the current weights (all ranks must call under ZeRO-3)."""
        self.engine.eval()
        out = []
        for ids in token_ids:
            mb = collate([Sample(ids, 1, [0.0] * (len(ids) - 1), 0.0)], self.pad_id)
            logprobs, _ = self._forward(mb, "raw")  # as the engine's prompt logprobs: unprocessed
            out.append(logprobs[0].float().cpu().tolist())
        return out

    # -- weights out ----------------------------------------------------------------------------------------------
    def _full_parameters(
        self, bucket_bytes: int, device: torch.device | str = "cpu", every_rank: bool = False
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full (gathered under ZeRO-3) named tensors, one bucket at a time, on `device`, on rank 0 (other ranks
        get empty buckets) or, with `every_rank`, on every rank. Under ZeRO-3 only the current bucket is
        materialised; every rank must iterate (the gathers are collectives)."""
        import deepspeed

        module = self.engine.module
        named = list(module.named_parameters())
        if self.cfg.zero_stage == 3:
            groups = group_into_buckets(((n, _Sized(p)) for n, p in named), bucket_bytes)
            lookup = dict(named)
            for group in groups:
                params = [lookup[n] for n, _ in group]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    if self.rank != 0 and not every_rank:  # only joined the gather
                        yield []
                        continue
                    yield [(n, p.detach().to(device, copy=True)) for (n, _), p in zip(group, params)]
        else:
            if self.cfg.lora is not None:  # the base model's names and shapes, adapters merged in
                named = merged_parameters(module)
            for group in group_into_buckets(named, bucket_bytes):
                yield [(n, _tensor(p).to(device)) for n, p in group] if self.rank == 0 or every_rank else []

    def weight_buckets(
        self, version: int, bucket_bytes: int, transport: str = "object_store", shm_dir: str | None = None
    ) -> Iterator[WeightBucket | None]:
        """Streaming generator (a Ray generator method): rank 0 yields one bucket per group of modules, other
        ranks only join the ZeRO-3 gathers and yield None. object_store: the bucket with its bytes; shm: a
        descriptor of a file in /dev/shm; torch_dist: a descriptor, then rank 0 broadcasts the bytes to the
        engines, which receive as they load that bucket (packed on the group's device: over NCCL the bytes never
        leave the GPU)."""
        device = self.weight_device if transport == "torch_dist" else torch.device("cpu")
        broken: Exception | None = None  # a torch_dist broadcast that failed (a member died or hung)
        for i, named in enumerate(self._full_parameters(bucket_bytes, device)):
            if self.rank != 0:
                yield None
            elif transport != "torch_dist":
                bucket = pack_bucket(version, i, named)
                yield bucket if transport == "object_store" else write_shm(bucket, shm_dir)
            elif broken is None:  # after a failure rank 0 still joins every ZeRO-3 gather, and sends nothing
                bucket, flat = pack_flat(version, i, named, device)
                yield bucket
                try:
                    broadcast_buffer(self.weight_group, flat)
                except Exception as e:  # noqa: BLE001 - this rank lives on; the sync rebuilds the group
                    broken = e
                    close_weight_group(self.weight_group)
                    self.weight_group = None
        if broken is not None:
            raise RuntimeError(f"broadcast of v{version} to the engines failed: {broken}")

    def open_weight_group(self, port: int, world_size: int, timeout_s: float, backend: str) -> None:
        """Rank 0 joins (and hosts) the process group it shares with the engines for the torch_dist transport:
        NCCL over GPU buffers or gloo over CPU buffers (`JobConfig.weight_group_backend`)."""
        close_weight_group(self.weight_group)  # the one it replaces, if any
        self.weight_group = None
        self.weight_group = open_weight_group(node_address(), port, 0, world_size, timeout_s, backend)
        self.weight_device = transport_device(backend)

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
        with _without_hf_zero3(), torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config)
        with model_folder(Path(directory)) as staging:  # a cut export never looks complete
            with _without_hf_zero3():
                shell.save_pretrained(staging, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
        return directory

    def export_adapter(self, directory: str) -> str | None:
        """Write the LoRA adapter as a peft folder (adapter_config.json + adapter_model.safetensors, loadable with
        `PeftModel.from_pretrained(base, directory)`); rank 0 writes. None without LoRA."""
        if self.cfg.lora is None or self.rank != 0:
            return None
        with model_folder(Path(directory)) as staging:
            self.engine.module.save_pretrained(staging, safe_serialization=True)
        return directory

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def _without_hf_zero3():
    """Suspend the HF DeepSpeed config that ZeRO-3 keeps alive: under it transformers builds every model inside
    zero.Init, whose parameter broadcasts are collectives, and rank 0 building alone would wait for the other
    ranks forever (the export's shell)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _tensor(p: torch.Tensor | MergedWeight) -> torch.Tensor:
    return p.value() if isinstance(p, MergedWeight) else p.detach()


class _Sized:
    """Stands in for a ZeRO-3 partitioned parameter when sizing buckets (its full numel is ds_numel)."""

    def __init__(self, p: torch.Tensor):
        self._numel = getattr(p, "ds_numel", p.numel())
        self._itemsize = p.element_size()

    def numel(self) -> int:
        return self._numel

    def element_size(self) -> int:
        return self._itemsize
