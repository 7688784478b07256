"""`actors`: rollout workers, vLLM engines as Ray actors, pooled behind one elastic generate.

| module | what it holds |
|---|---|
| `config.py`   | the `rollout` config section (workers, engine, sampling, placement) |
| `engine.py`   | `RolloutEngine`: one in-process `vllm.LLM`, Arrow in, ROLLOUT_SCHEMA rows out (no Ray) |
| `worker.py`   | `RolloutWorker`: the engine as a Ray actor; loads published weights, joins the broadcast group |
| `pool.py`     | `RolloutPool`: N workers behind one `generate`; scaling, death and hang tolerant |
| `dispatch.py` | one `generate` call: token-balanced chunks handed to free workers, each result accepted once |
| `worker_placement.py` | where a worker may run (placement by role) and how the pool waits for it |
| `balance.py`  | token-balanced chunking |
| `prompts.py`  | the checks a prompt table passes before dispatch |

Imports only `contract` and third-party libraries; `cluster` drives it.
"""
