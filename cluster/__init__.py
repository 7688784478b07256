"""`cluster`: composes the other packages into a job. Start reading here.

Where a reader starts: `cluster/job/controller.py`, `Controller._main`. It is the recipe of a
run, top to bottom: load the prompts, start the services in dependency order
(`job/services.py`), restore a checkpoint if resuming, run the loop (`job/loop.py`), write the
report, stop the services.

| module / package | what it holds | where it runs |
|---|---|---|
| `cli.py`      | `rlhf` and its subcommands, thin shells over the functions below | the user's process |
| `config.py`   | `JobConfig`: every package's section composed; YAML + dotted overrides | anywhere |
| `configs/`    | shipped job YAMLs (demo, async GRPO, GPU cluster, reward-model training) | - |
| `errors.py`   | `UsageError` (exit 2) and `JobFailed` (exit 1), both one line | anywhere |
| `launch/`     | `rlhf train` (preflight, Ray session, following the controller), `submit`, `scale`/`status`/`stop` | the user's process |
| `job/`        | the controller actor, the services it starts, the training loop, weight sync, rollout tables, Ray gauges | inside the cluster |
| `outputs/`    | the run directory (config, metrics, Parquet, checkpoints, TensorBoard) and the report | the controller |
| `demo/`       | the demo task (synthetic prompts, gold rule, RM preference pairs) and tiny local models | the user's process |
| `manifests/`  | Ray cluster launcher and KubeRay RayJob manifests | - |

Arrows: `cluster` imports `actors`, `learner`, `reward_service` and `contract`; nothing imports
`cluster` except its own modules, the tests and the benchmarks.
"""
