"""`cluster`: composes the other packages into a job. Start reading here.

Where a reader starts: `cluster/job/controller.py`, `Controller._main`. It is the recipe of a
run, top to bottom: load the prompts, start the services from the job's plan (`plan.py`;
`job/services.py`: three together,
then the weight sync), restore a checkpoint if resuming, run the loop (`job/loop.py`), write the
report, stop the services.

| module / package | what it holds | where it runs |
|---|---|---|
| `cli.py`      | `rlhf` and its subcommands, thin shells over the functions below | the user's process |
| `config.py`   | `JobConfig`: every package's section composed; YAML + dotted overrides | anywhere |
| `plan.py`     | `JobPlan`: every value derived from several sections (the learner's scoring temperature and correction, staleness, the engines' LoRA rank, reward replicas), made once by the preflight | the user's process; handed to the controller |
| `config_yaml.py` | `rlhf config [SECTION]`: the defaults as commented YAML, rendered from the models | the user's process |
| `configs/`    | shipped job YAMLs (demo, async GRPO, GPU cluster, reward-model training) | - |
| `errors.py`   | `UsageError` (exit 2) and `JobFailed` (exit 1), both one line | anywhere |
| `launch/`     | `rlhf train` (`train.py`, `preflight.py`: every check that can run before Ray starts), `submit`, `scale`/`status`/`stop`, `train-sft`, `generate`, `replay` (`replay.py`: retrain from the Parquet, weights checked bit for bit) | the user's process |
| `job/`        | the controller actor, the services it starts, the training loop (`loop.py`, `produce.py`: one step's experience, `evaluation.py`: held-out eval), weight sync, rollout tables, Ray gauges, autoscaler requests, the shared-storage check, reward-model refresh from ratings | inside the cluster |
| `outputs/`    | the run directory (config, metrics, Parquet, checkpoints, TensorBoard, weights.jsonl), tensor digests (`weight_digest.py`) and the report | the controller |
| `demo/`       | the demo task (synthetic prompts, gold rule, RM preference pairs) and tiny local models | the user's process |
| `manifests/`  | Ray cluster launcher and KubeRay RayJob manifests (placement by role) | - |
| `monitoring/` | Grafana dashboard of the RL metrics and the Prometheus scrape config | - |

Arrows: `cluster` imports `actors`, `learner`, `reward_service` and `contract`; nothing imports
`cluster` except its own modules, the tests and the benchmarks.
"""
