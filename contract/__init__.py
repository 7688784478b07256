"""`contract`: the small shared contract between `actors`, `learner`, `reward_service` and `cluster`.

The three worker packages never import each other or `cluster`; they meet only here.

| module | what it holds |
|---|---|
| `experience.py`  | the Arrow experience schema (rollout + reward columns) and its checks |
| `weights.py`     | the weight-sync protocol: manifest, buckets, side group, object-store packing, versions |
| `devices.py`     | `DeviceProfile`: the one place device, backend, vLLM settings and actor environment are decided |
| `config_base.py` | the strict config base (`Section`) and one-line config errors |
| `datasets.py`, `chat.py` | prompt, preference and SFT data readers; chat conversations and templates |
| `placement.py`   | placement by role (custom resources per role) |
| `atomic.py`      | the one way to write a file or directory so no reader sees it half written |
| `user_code.py`   | loading `package.module:function` named in a config |
| `net.py`         | free ports |
"""
