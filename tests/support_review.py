"""Shared test helpers (not a test module): the review page's reward app fixture, Chromium, sign-in and page helpers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from contract.net import free_port


TOKEN_ENV, TOKEN = "RLHF_TEST_REVIEW_TOKEN", "review-s3cret"


AUTH = {"Authorization": f"Bearer {TOKEN}"}


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


XSS = ' <script>window.__pwned = 1</script> red <img src=x onerror="window.__pwned = 2">'


STEPS = {0: [("p0", "Describe the sky:", [" blue sky with white clouds", " the dog runs"])],
         1: [("p0", "Describe the sky:", [XSS, " green green sea"]),
             ("p1", "Name a <b>bold</b> colour & a fruit:", [" orange orange", " &amp; <b>not bold</b>"])]}


def chromium():
    """Debian's Chromium through its own chromedriver (Selenium downloads nothing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
              "--disable-background-networking", "--disable-extensions", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def wait(driver, predicate, timeout=60):
    """predicate(driver) once truthy (rows re-rendered under a read are read again)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25,
                         ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: predicate(d))


def rows(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#samples tbody tr.sample")


def sign_in(driver, url: str, token: str = TOKEN) -> None:
    """Open the page with ?token= once (the cookie), stop the auto refresh, wait for the first listing."""
    from selenium.webdriver.common.by import By

    from selenium.common.exceptions import TimeoutException

    driver.get(f"{url}/review?token={token}")
    try:
        wait(driver, lambda d: d.current_url.endswith("/review") and d.find_element(By.TAG_NAME, "body")
             .get_attribute("data-loaded"), timeout=120)
    except TimeoutException:
        console = [e["message"] for e in driver.get_log("browser")]
        raise AssertionError(f"the page did not load at {driver.current_url}: {driver.page_source[:1500]} "
                             f"console: {console}") from None
    if driver.find_element(By.ID, "f-auto").is_selected():
        driver.find_element(By.ID, "f-auto").click()
    apply_filters(driver)  # a listing after the auto refresh stopped: rows stay put from here on


def apply_filters(driver) -> None:
    from selenium.webdriver.common.by import By

    before = driver.find_element(By.TAG_NAME, "body").get_attribute("data-loaded")
    driver.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") != before)


def write_run(run_root: Path, client) -> None:
    """Score the STEPS samples with the app and write them as the controller does."""
    from cluster.job.rollout_table import provenance, with_rewards
    from cluster.outputs.run_dir import RunDir
    from contract.experience import rollout_batch
    from reward_service.functions import colour_fraction

    run = RunDir(run_root).create("name: review-test\n")
    for step, groups in STEPS.items():
        batch = [{"prompt_id": pid, "sample_idx": i, "prompt": prompt, "prompt_ids": [5, 6], "response": resp,
                  "response_ids": [7, 8, 9], "logprobs": [-1.0, -1.0, -1.0], "finish_reason": "length",
                  "policy_version": step, "worker_id": "rollout-0", "gen_s": 0.1}
                 for pid, prompt, resps in groups for i, resp in enumerate(resps)]
        table = pa.Table.from_batches([rollout_batch(batch)])
        scored = with_rewards(table, client.score(table.column("prompt").to_pylist(),
                                                  table.column("response").to_pylist()))
        gold = colour_fraction(scored.column("prompt").to_pylist(), scored.column("response").to_pylist())
        run.write_rollouts(step, provenance(scored, step, np.ones(scored.num_rows, bool), gold))
        run.log_metrics(step, {"reward_mean": float(np.mean(scored.column("reward").to_numpy())), "kl": 0.01 * step,
                               "gold_mean": float(np.mean(gold)), "reward_model_version": 0})
    run.close()


@pytest.fixture(scope="module")
def app(ray_local, tiny_models, tmp_path_factory):
    import os

    from reward_service.app import deploy, shutdown
    from reward_service.config import RewardConfig

    os.environ[TOKEN_ENV] = TOKEN
    run = tmp_path_factory.mktemp("review_run")
    cfg = RewardConfig(model_dir=str(tiny_models["reward"]), feedback={"alpha": 0.5}, max_batch_size=8,
                       num_replicas=2, http_port=free_port(), token_env=TOKEN_ENV, request_timeout_s=60)
    client = deploy(cfg, run / "reward_store", name="review_t", rollouts_dir=run / "rollouts",
                    metrics_file=run / "metrics.jsonl")
    write_run(run, client)
    yield {"client": client, "url": client.http_url, "run": run, "ratings": run / "reward_store" / "ratings"}
    shutdown("review_t")
    os.environ.pop(TOKEN_ENV, None)


def parts(table, key: str) -> list[float]:
    return [dict(p)[key] for p in table.column("reward_parts").to_pylist()]
