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

import pytest
import requests

from support_review import AUTH, STEPS, TOKEN, XSS, app, apply_filters, chromium, parts, rows, sign_in, wait


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()




def stored_ratings(app) -> list[str]:
    """The lines of the ratings file (none before the first rating): each test compares it before and
    after, so the tests hold in any order, whatever the others rated."""
    labels = app["ratings"] / "labels.jsonl"
    return labels.read_text().splitlines() if labels.exists() else []


def test_page_and_every_route_need_the_token(app):
    url, before = app["url"], stored_ratings(app)
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
    assert stored_ratings(app) == before  # nothing a 401 could have stored
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
    kw, before = {"data": body} if isinstance(body, bytes) else {"json": body}, stored_ratings(app)
    r = requests.request(method, f"{app['url']}/{route}", headers=AUTH, timeout=30, **kw)
    assert r.status_code == status and says in r.json()["error"] and "\n" not in r.json()["error"], r.text
    assert stored_ratings(app) == before  # a bad batch stores nothing, not even its good half


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
    client, ratings, earlier = app["client"], app["ratings"], len(stored_ratings(app))
    row = next(r for r in rows(browser) if r.get_attribute("data-step") == "0" and r.get_attribute("data-sample-idx") == "0")
    _, prompt, (liked, _) = STEPS[0][0]
    before = client.score([prompt], [liked])
    row.find_element(By.CSS_SELECTOR, "button.like").click()
    wait(browser, lambda d: "saved: like" in d.find_element(By.ID, "status").text)
    after = client.score([prompt], [liked])  # the next scoring call fuses it
    assert parts(before, "feedback") == [0.0] and parts(after, "feedback") == [1.0]
    assert after.column("reward")[0].as_py() == pytest.approx(0.5 * 1.0 + 0.5 * parts(after, "model")[0], rel=1e-5)
    labels = [json.loads(line) for line in stored_ratings(app)[earlier:]]
    assert [(x["prompt"], x["response"], x["label"], x["step"]) for x in labels] == [(prompt, liked, 1, 0)]

    other = rows(browser)[1]
    other.find_element(By.CSS_SELECTOR, "button.score[data-value='2']").click()
    wait(browser, lambda d: "saved: score 2" in d.find_element(By.ID, "status").text)
    labels = [json.loads(line) for line in stored_ratings(app)[earlier:]]
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
