"""TEMPORARY (helper h24): demos that the fixed tests fail when what they guard breaks. Deleted after."""
import pytest


def test_demo_unit_test_that_starts_ray_is_caught():
    import importlib

    importlib.import_module("r" + "ay").init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)


def test_demo_serve_left_behind_is_attributed_here(ray_local, tmp_path):
    from contract.net import free_port
    from reward_service import app as reward_app
    from reward_service.config import RewardConfig

    cfg = RewardConfig(model_dir=None, functions=[{"path": "reward_service.functions:colour_fraction"}],
                       http_port=free_port())
    reward_app.deploy(cfg, tmp_path / "store", name="leaky")  # and never shut down


def test_demo_half_way_deploy_without_its_cleanup(ray_local, serve_controller_pids, tmp_path, monkeypatch):
    import test_cluster
    from reward_service import app as reward_app

    monkeypatch.setattr(reward_app, "shutdown", lambda name="reward": None)  # the guarded cleanup, reverted
    test_cluster.test_a_reward_app_that_fails_half_way_leaves_no_serve_running(
        ray_local, serve_controller_pids, tmp_path, monkeypatch)


def test_demo_rm_that_learned_nothing(tiny_chat_models, tiny_models, tmp_path, monkeypatch):
    import test_contract_datasets_chat_rm as t
    from reward_service import config

    orig = config.RewardModelTrainConfig.__init__

    def no_learning(self, **kw):
        orig(self, **{**kw, "lr": 1e-12})
    monkeypatch.setattr(config.RewardModelTrainConfig, "__init__", no_learning)
    t.test_train_rm_on_conversations_in_its_own_template(tiny_chat_models, tiny_models, tmp_path)
