"""The TRL side of `bench/vs_trl.py`: TRL's GRPOTrainer on a job that vs_trl.py wrote as JSON.

Runs in TRL's own virtual environment (TRL is a peer, not a dependency of aha); imports nothing of aha but
the reward functions (`aha.actors.rewards.*`: plain Python, loaded from their files), so both sides score
with the same code. Prints nothing useful; writes one JSON object to the job's `out` file:
per step `step_s`, `generate_score_s` (TRL's `_generate_and_score_completions`: generation with transformers
`generate` in this process, then the rewards) and `train_s` (the rest of the step: forward, backward, optimizer);
held-out accuracy (greedy, the same prompts and reward as aha) at the job's `eval_at` steps, timed apart;
and process CPU time / wall time over training.

    <trl-venv>/bin/python bench/trl_grpo.py JOB.json
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_function(spec: str):
    """`module:name`; aha's own reward modules (`aha.actors.rewards.*`, aha is not installed in TRL's venv) are
    loaded from their files."""
    module, name = spec.split(":")
    if not module.startswith("aha."):
        return getattr(importlib.import_module(module), name)
    path = ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")
    found = importlib.util.spec_from_file_location(f"_aha_{path.stem}", path)
    loaded = importlib.util.module_from_spec(found)
    found.loader.exec_module(loaded)
    return getattr(loaded, name)


def make_reward(spec: dict, threshold_only: bool = False):
    """TRL's reward signature around one of aha's reward functions (prompt text, completion text, fields)."""
    fn = load_function(spec["function"])
    kwargs = spec.get("kwargs", {})

    def reward(prompts, completions, fields, **_):
        out = []
        for prompt, completion, row in zip(prompts, completions, fields):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
            out.append(float(fn(question, text, **json.loads(row), **kwargs)))
        return out

    reward.__name__ = spec["function"].split(":")[-1]
    return reward


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    os.environ.update(OMP_NUM_THREADS=str(job["threads"]), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import torch

    torch.set_num_threads(job["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    s = job["settings"]
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)

    def as_prompt(text: str):
        return [{"role": "user", "content": text}] if job["chat_template"] else text

    train = Dataset.from_list(
        [{"prompt": as_prompt(p["text"]), "fields": json.dumps(p["fields"])} for p in job["train_prompts"]]
    )
    rewards = [make_reward(f) for f in job["rewards"]]
    args = GRPOConfig(
        output_dir=job["work_dir"],
        use_cpu=True,
        seed=job["seed"],
        max_steps=job["steps"],
        per_device_train_batch_size=s["prompts_per_step"] * s["samples_per_prompt"],
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=s["samples_per_prompt"],
        num_iterations=1,
        shuffle_dataset=False,  # prompts in aha's order
        max_completion_length=s["max_tokens"],
        temperature=s["temperature"],
        top_p=s["top_p"],
        top_k=s["top_k"],
        learning_rate=s["lr"],
        adam_beta1=s["betas"][0],
        adam_beta2=s["betas"][1],
        adam_epsilon=s["eps"],
        weight_decay=s["weight_decay"],
        max_grad_norm=s["grad_clip"],
        gradient_checkpointing=s["gradient_checkpointing"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,  # no KL term
        loss_type="dapo",  # token-level mean over the whole batch = aha's loss_agg token_mean
        scale_rewards="group",
        reward_weights=[f["weight"] for f in job["rewards"]],
        bf16=s["bf16"],  # CPU autocast: fp32 weights, bf16 matmuls (aha: bf16 weights, fp32 master copy)
        fp16=False,
        logging_steps=10**9,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=rewards, args=args, train_dataset=train, processing_class=tokenizer
    )

    generation: list[float] = []
    original = trainer._generate_and_score_completions

    def timed_generation(*a, **k):
        started = time.perf_counter()
        out = original(*a, **k)
        generation.append(time.perf_counter() - started)
        return out

    trainer._generate_and_score_completions = timed_generation
    eval_prompts = job["eval_prompts"]
    eval_reward = load_function(job["rewards"][0]["function"])

    def evaluate() -> float:
        """Greedy completions of the held-out prompts, scored by the first reward function (aha's eval)."""
        model.eval()
        tokenizer.padding_side = "left"
        texts = [
            tokenizer.apply_chat_template([m], add_generation_prompt=True, tokenize=False)
            if job["chat_template"]
            else p["text"]
            for p, m in ((p, {"role": "user", "content": p["text"]}) for p in eval_prompts)
        ]
        correct = 0
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                enc = tokenizer(
                    texts[i : i + 64],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=not job["chat_template"],
                )
                out = model.generate(
                    **enc,
                    max_new_tokens=s["eval_max_tokens"],
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                for p, ids in zip(eval_prompts[i : i + 64], out[:, enc["input_ids"].shape[1] :]):
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    score = eval_reward(p["text"], text, **p["fields"], **job["rewards"][0].get("kwargs", {}))
                    correct += float(score) >= job["eval_threshold"]
        model.train()
        return correct / max(len(eval_prompts), 1)

    record = {"steps": [], "eval": {}, "eval_s": 0.0}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_s = time.perf_counter() - self.started
            gen = generation[-1] if generation else 0.0
            record["steps"].append({"step_s": step_s, "generate_score_s": gen, "train_s": step_s - gen})
            if state.global_step in job["eval_at"]:
                started = time.perf_counter()
                record["eval"][str(state.global_step)] = evaluate()
                record["eval_s"] += time.perf_counter() - started

    trainer.add_callback(Timer())
    if 0 in job["eval_at"]:
        record["eval"]["0"] = evaluate()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    trainer.train()
    cpu1, wall1 = cpu_seconds(), time.perf_counter()
    record["wall_s"] = wall1 - wall0
    record["cpu_s"] = cpu1 - cpu0
    record["threads"] = torch.get_num_threads()
    record["versions"] = {
        "trl": importlib.import_module("trl").__version__,
        "transformers": importlib.import_module("transformers").__version__,
        "torch": torch.__version__,
    }
    Path(job["out"]).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
