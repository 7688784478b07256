"""The reward service: a Ray Serve app that scores (prompt, response) pairs with a reward model,
reward functions and live human feedback (`app.deploy` -> `client.RewardClient`), and
`train_rm.train_reward_model` behind `rlhf train-rm`. Imports only `contract` and third-party libs.
"""
