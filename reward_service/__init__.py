"""`reward_service`: a Ray Serve app that scores (prompt, response) pairs, and what trains its models.

| module | what it holds |
|---|---|
| `config.py`   | the `reward` config section and `train-rm`'s |
| `app.py`      | `deploy` / `shutdown` of the app -> `client.RewardClient` (handle and HTTP, retries, timeouts) |
| `replicas.py` | the Serve deployments: scoring replicas (model + functions + feedback) and the feedback store's replica |
| `http.py`     | the app's HTTP routes: score, feedback, ratings, the review page (token-protected) |
| `model.py`    | the reward model: tokenizer, its own chat template, forward |
| `combine.py`  | r = a*r_feedback + (1-a)*(w_m*r_model + sum w_i*fn_i), the per-part checks |
| `feedback.py` | the durable feedback store and its n-gram matching |
| `functions.py`| built-in reward functions (the demo's gold rule) |
| `review.py`, `review_page/` | what the review page shows (samples, curves) and the page itself |
| `ratings.py`  | ratings -> feedback + a preference dataset in train-rm's formats |
| `versions.py` | reward model versions, hot-swapped in every replica |
| `train_rm.py`, `rm_from_ratings.py` | `rlhf train-rm` (Bradley-Terry / BCE) and `--from-run` |

Imports only `contract` and third-party libraries; `cluster` drives it.
"""
