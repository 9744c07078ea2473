"""TRL's side of tests/integration/test_trl_oracle.py, run in TRL's own virtual environment (TRL is a peer, not a
dependency of aha; nothing of aha is imported here).

A real GRPOTrainer on the job's model generates completions for the job's prompts and scores them
(`_generate_and_score_completions`: its sampling, rewards and advantages), once per `scale_rewards` setting from
the same torch seed; then, for each case (a loss type and its settings), a trainer built with those settings
computes its loss (`_compute_loss`) on that batch, with the given proximal (old) and reference logprobs, and the
gradient of every weight. Writes the batch, rewards, advantages, losses and gradients to the job's `out` folder:
batch.safetensors, grads_<case>.safetensors and result.json.

    <trl-venv>/bin/python tests/integration/trl_loss_side.py JOB.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import torch
    from datasets import Dataset
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    out = Path(job["out"])
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [{"prompt": text} for text in job["prompts"]]
    n = job["num_generations"]
    rewards_seen: list[float] = []

    def reward_length_mod_3(prompts, completions, **_):
        """Deterministic in the completion's text, with ties inside groups (0, 0.5 or 1)."""
        values = [(len(c) % 3) / 2 for c in completions]
        rewards_seen.extend(values)
        return values

    def trainer(**settings) -> GRPOTrainer:
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
        args = GRPOConfig(
            output_dir=str(out / "trl"),
            use_cpu=True,
            seed=0,
            per_device_train_batch_size=len(rows) * n,
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_generations=n,
            max_completion_length=job["max_completion_length"],
            temperature=1.0,
            bf16=False,  # fp32 as aha's side here (TRL's default on a CPU with bf16 is autocast)
            report_to="none",
            save_strategy="no",
            logging_steps=10**9,
            disable_tqdm=True,
            **settings,
        )
        made = GRPOTrainer(
            model=model,
            reward_funcs=[reward_length_mod_3],
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        made.current_gradient_accumulation_steps = (
            1  # what its training loop sets for gradient_accumulation_steps=1
        )
        return made

    # one generation per advantage scaling, the same torch seed: the same completions, TRL's own advantages
    batches = {}
    for scale in job["scale_rewards"]:
        rewards_seen.clear()
        torch.manual_seed(job["seed"])
        batch = trainer(scale_rewards=scale, beta=0.0)._generate_and_score_completions(
            [row for row in rows for _ in range(n)]
        )
        batches[scale] = {"batch": batch, "rewards": list(rewards_seen)}
    first = batches[job["scale_rewards"][0]]["batch"]
    for scale, seen in batches.items():
        if not torch.equal(seen["batch"]["completion_ids"], first["completion_ids"]):
            raise SystemExit(f"scale_rewards={scale}: other completions from the same seed")
    tensors = {
        k: first[k].contiguous() for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    }

    # the proximal and reference policies: the current logprobs moved by fixed noise, so ratios leave 1 and clips act
    probe = trainer(beta=0.0)
    input_ids = torch.cat([tensors["prompt_ids"], tensors["completion_ids"]], dim=1)
    attention = torch.cat([tensors["prompt_mask"], tensors["completion_mask"]], dim=1)
    with torch.no_grad():
        logps = probe._get_per_token_logps_and_entropies(
            probe.model, input_ids, attention, tensors["completion_ids"].size(1)
        )[0]  # (logprobs, entropies, aux loss)
    tensors["logps"] = logps
    noise = torch.Generator().manual_seed(job["seed"])
    tensors["old_logps"] = logps + job["noise"] * torch.randn(logps.shape, generator=noise)
    tensors["ref_logps"] = logps + job["noise"] * torch.randn(logps.shape, generator=noise)
    for scale in batches:
        tensors[f"advantages_{scale}"] = batches[scale]["batch"]["advantages"].contiguous()
    save_file(tensors, str(out / "batch.safetensors"))

    result = {"rewards": batches[job["scale_rewards"][0]]["rewards"], "losses": {}}
    for case in job["cases"]:
        made = trainer(**case["trl"])
        made.model.train()
        inputs = {
            **{k: tensors[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")},
            "advantages": tensors[f"advantages_{case['trl'].get('scale_rewards', 'group')}"],
            "old_per_token_logps": tensors["old_logps"],
            "ref_per_token_logps": tensors["ref_logps"],
            "num_items_in_batch": tensors["completion_mask"].sum(),
        }
        loss = made._compute_loss(made.model, inputs)
        loss.backward()
        result["losses"][case["name"]] = float(loss)
        grads = {name: p.grad.contiguous() for name, p in made.model.named_parameters() if p.grad is not None}
        save_file(grads, str(out / f"grads_{case['name']}.safetensors"))
    import trl

    result["versions"] = {"trl": trl.__version__, "torch": torch.__version__}
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
