"""Rollout workers: vLLM engines as Ray actors (`worker.RolloutWorker`), pooled behind one
elastic, death-tolerant `generate` (`pool.RolloutPool`), producing Arrow ROLLOUT_SCHEMA rows.

Imports only `contract` and third-party libraries; `cluster` drives it.
"""
