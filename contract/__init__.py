"""The small shared contract between `actors`, `learner`, `reward_service` and `cluster`.

The three worker packages never import each other or `cluster`; they meet only here:
the Arrow experience schema, the weight-sync protocol, the device profile, the strict config
base, and the dataset readers.
"""
