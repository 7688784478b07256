"""The review page on a real reward Serve app (local Ray), in Debian's headless Chromium.

The app reads a run directory whose samples were scored by the app itself and written the way
the controller writes them (`with_rewards` -> `provenance` -> `RunDir.write_rollouts`). Covered:
the token (401 for the page, the API and the rating endpoint), one-line JSON errors, the page
listing and filtering samples, markup in a response shown as text, likes / scores / A/B picks
landing in the feedback store and the preference files. (The reward models that ratings lead to:
test_reward_service_review_models.py; a running job: test_reward_service_review_job.py.)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import requests

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


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def parts(table, key: str) -> list[float]:
    return [dict(p)[key] for p in table.column("reward_parts").to_pylist()]


def test_page_and_every_route_need_the_token(app):
    url = app["url"]
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"ok": True}
    gets = ["review", "review/app.js", "samples", "curves", "ratings"]
    posts = [("rate", {"kind": "like", "prompt": "p", "response": "r", "value": True}),
             ("score", {"prompts": ["p"], "responses": ["r"]}), ("feedback", {"records": []})]
    for bad in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "rlhf_review_token=wrong"}):
        for route in gets:
            r = requests.get(f"{url}/{route}", headers=bad, timeout=30)
            assert r.status_code == 401 and "token" in r.json()["error"], (route, bad, r.text)
        for route, body in posts:
            assert requests.post(f"{url}/{route}", json=body, headers=bad, timeout=30).status_code == 401, route
    assert requests.get(f"{url}/review?token=wrong", allow_redirects=False, timeout=30).status_code == 401
    assert not (app["ratings"] / "labels.jsonl").exists()  # nothing a 401 could have stored
    page = requests.get(f"{url}/review", headers=AUTH, timeout=30)
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    signed = requests.get(f"{url}/review?token={TOKEN}", allow_redirects=False, timeout=30)
    assert signed.status_code == 303 and "HttpOnly" in signed.headers["set-cookie"]


@pytest.mark.parametrize("method,route,body,status,says", [
    ("GET", "samples?step=x", None, 400, "'step' must be an integer"),
    ("GET", "samples?limit=0", None, 400, "'limit' must be >= 1"),
    ("POST", "rate", b"{not json", 400, "body is not valid JSON"),
    ("POST", "rate", {"kind": "love", "prompt": "p", "response": "r"}, 400, "'kind' must be one of like, score, pick"),
    ("POST", "rate", {"kind": "score", "prompt": "p", "response": "r", "value": 7}, 400, "integer 1-5"),
    ("POST", "rate", {"kind": "like", "prompt": "p", "response": "r", "value": "yes"}, 400, "true (like)"),
    ("POST", "rate", {"kind": "pick", "prompt": "p", "chosen": "a"}, 400, "'rejected' must be a string"),
    ("POST", "rate", {"kind": "like", "prompt": "p", "response": "r", "value": True, "rating_id": "a b"}, 400,
     "'rating_id'"),
    ("POST", "rate", {"ratings": [{"kind": "like", "prompt": "p", "response": "ok", "value": True}, {"kind": "x"}]},
     400, "rate[1]: field 'kind'"),
    ("GET", "nowhere", None, 404, "unknown endpoint"),
])
def test_bad_input_is_a_one_line_json_4xx(app, method, route, body, status, says):
    kw = {"data": body} if isinstance(body, bytes) else {"json": body}
    r = requests.request(method, f"{app['url']}/{route}", headers=AUTH, timeout=30, **kw)
    assert r.status_code == status and says in r.json()["error"] and "\n" not in r.json()["error"], r.text
    assert not (app["ratings"] / "labels.jsonl").exists()  # a bad batch stores nothing, not even its good half


def test_a_cookie_post_must_be_json(app):
    s = requests.Session()
    s.get(f"{app['url']}/review?token={TOKEN}", timeout=30)
    r = s.post(f"{app['url']}/rate", data="kind=like", headers={"Content-Type": "application/x-www-form-urlencoded"},
               timeout=30)
    assert r.status_code == 415 and "application/json" in r.json()["error"]


@pytest.mark.slow  # a real browser
def test_page_lists_samples_newest_first_filters_and_shows_markup_as_text(app, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, app["url"])
    want = [(s, pid, i) for s in sorted(STEPS, reverse=True) for pid, _, resps in STEPS[s] for i in range(len(resps))]
    got = [(int(r.get_attribute("data-step")), r.get_attribute("data-prompt-id"), int(r.get_attribute("data-sample-idx")))
           for r in rows(browser)]
    assert got == want
    responses = [r.find_element(By.CSS_SELECTOR, "pre.response").text for r in rows(browser)]
    assert XSS in responses and " &amp; <b>not bold</b>" in responses  # exactly the characters, no markup
    assert browser.execute_script("return window.__pwned === undefined")
    assert not browser.find_elements(By.CSS_SELECTOR, "#samples tbody script, #samples tbody img, #samples tbody b")
    origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {app["url"].rsplit("/", 1)[0]}, origins  # nothing fetched from elsewhere
    browser.find_element(By.ID, "f-step").send_keys("0")
    apply_filters(browser)
    wait(browser, lambda d: {r.get_attribute("data-step") for r in rows(d)} == {"0"})
    browser.find_element(By.ID, "f-step").clear()
    browser.find_element(By.ID, "f-prompt").send_keys("BOLD")
    apply_filters(browser)
    wait(browser, lambda d: len(rows(d)) == 2 and {r.get_attribute("data-prompt-id") for r in rows(d)} == {"p1"})
    assert len(browser.find_elements(By.CSS_SELECTOR, "#live .chart svg polyline")) >= 3  # reward, gold, KL
    browser.find_element(By.ID, "f-prompt").clear()
    apply_filters(browser)
    wait(browser, lambda d: len(rows(d)) == len(want))


@pytest.mark.slow  # a real browser
def test_like_score_and_ab_pick_through_the_page_are_stored_and_fused(app, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, app["url"])
    client, ratings = app["client"], app["ratings"]
    row = next(r for r in rows(browser) if r.get_attribute("data-step") == "0" and r.get_attribute("data-sample-idx") == "0")
    _, prompt, (liked, _) = STEPS[0][0]
    before = client.score([prompt], [liked])
    row.find_element(By.CSS_SELECTOR, "button.like").click()
    wait(browser, lambda d: "saved: like" in d.find_element(By.ID, "status").text)
    after = client.score([prompt], [liked])  # the next scoring call fuses it
    assert parts(before, "feedback") == [0.0] and parts(after, "feedback") == [1.0]
    assert after.column("reward")[0].as_py() == pytest.approx(0.5 * 1.0 + 0.5 * parts(after, "model")[0], rel=1e-5)
    labels = [json.loads(line) for line in (ratings / "labels.jsonl").read_text().splitlines()]
    assert [(x["prompt"], x["response"], x["label"], x["step"]) for x in labels] == [(prompt, liked, 1, 0)]

    other = rows(browser)[1]
    other.find_element(By.CSS_SELECTOR, "button.score[data-value='2']").click()
    wait(browser, lambda d: "saved: score 2" in d.find_element(By.ID, "status").text)
    labels = [json.loads(line) for line in (ratings / "labels.jsonl").read_text().splitlines()]
    assert (labels[-1]["response"], labels[-1]["label"], len(labels)) == (STEPS[1][0][2][1], 0, 2)
    assert parts(client.score([prompt], [labels[-1]["response"]]), "feedback") == [-0.5]

    a, b = [r for r in rows(browser) if r.get_attribute("data-prompt-id") == "p1"]
    a.find_element(By.CSS_SELECTOR, "button.compare").click()
    b.find_element(By.CSS_SELECTOR, "button.compare").click()
    wait(browser, lambda d: d.find_element(By.ID, "pick-b").is_enabled())
    browser.find_element(By.ID, "pick-b").click()
    wait(browser, lambda d: "saved: B is better" in d.find_element(By.ID, "status").text)
    pair = json.loads((ratings / "pairs.jsonl").read_text().splitlines()[-1])
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (STEPS[1][1][1], STEPS[1][1][2][1], STEPS[1][1][2][0])
    assert "pairs" in browser.find_element(By.ID, "summary").text


def test_a_retried_rating_is_stored_once(app):
    rating = {"kind": "like", "prompt": "q", "response": "black white", "value": False, "rating_id": "retry-1"}
    for _ in range(2):
        assert requests.post(f"{app['url']}/rate", json=rating, headers=AUTH, timeout=30).status_code == 200
    labels = (app["ratings"] / "labels.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["rating_id"] == "retry-1" for x in labels) == 1
    store = (app["run"] / "reward_store" / "feedback.jsonl").read_text().splitlines()
    assert sum(json.loads(x).get("request_id") == "rating:retry-1" for x in store) == 1
