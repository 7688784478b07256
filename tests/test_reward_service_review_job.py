"""One running tiny job, submitted the way a cluster user does, and what people and operators do with
it. A job start costs 1.5-2 minutes on a 2-core box, so these checks share one:

`rlhf submit` (`ray job submit`) of a sync job to a `ray start --head` cluster (dashboard, metrics
export port, a Ray temp dir of its own); while it runs: its review page in Debian's headless
Chromium (samples, a like fused into the next step's reward, an A/B pick), `rlhf status`,
`rlhf reward-model update`, `rlhf scale` 1 -> 2 -> 1 with a rollout worker killed with SIGKILL in
between, the RL gauges on Ray's Prometheus endpoint, and a real Prometheus (Debian's) scraping the
job with the shipped scrape config while every query of the shipped Grafana dashboard is checked for
data; then `rlhf stop`: the job SUCCEEDED, checkpointed, and every sample is in the Parquet once.

The job samples with a fixed seed and a learning rate too small to change a sampled token, so the
same prompt gets the same responses every step: a response liked on the page comes back at the
next step, where its fused reward must include the like.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import yaml

from contract.net import free_port
import support_jobs
from support_jobs import VENV_BIN, actor_pid, check_exactly_once, cli_env, metrics_rows, wait_for
from support_review import apply_filters, chromium, rows, sign_in, wait


pytestmark = pytest.mark.slow
TOKEN_ENV, TOKEN = "RLHF_TEST_JOB_TOKEN", "job-s3cret"
PROMPTS = ["red cat runs", "<script>window.__pwned = 3</script> blue sky"]
NAME, ALPHA, PER_STEP, N = "review-job", 0.5, 2, 2
# Gauges the tiny job never sets, so their panels have no data to show; every other query must.
NEVER_EMITTED = {"is_weight_mean": "the learner reports importance-sampling weights only with a rollout "
                                   "correction that has something to correct; this sync job has none",
                 "is_weight_max": "as is_weight_mean", "is_truncated_frac": "as is_weight_mean",
                 "is_masked_frac": "as is_weight_mean"}


def env() -> dict:
    return cli_env(**{TOKEN_ENV: TOKEN})


def rlhf(*args, timeout=300) -> subprocess.CompletedProcess:
    return support_jobs.rlhf(*args, timeout=timeout, **{TOKEN_ENV: TOKEN})


def steps_on_disk(run: Path) -> list[int]:
    return sorted(int(f.stem.removeprefix("step=")) for f in (run / "rollouts").glob("step=*.parquet"))


def step_rows(run: Path, step: int) -> list[dict]:
    return pq.read_table(run / "rollouts" / f"step={step:06d}.parquet").to_pylist()


def workers_from(run: Path, first_step: int) -> set[str]:
    return {r["worker_id"] for s in steps_on_disk(run) if s >= first_step for r in step_rows(run, s)}


def http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=3).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def head():
    """A Ray head with the dashboard from `ray start --block`, in a Ray temp dir of its own (where the
    Prometheus service discovery file is written; short: Ray's socket paths live under it) and with the
    reward token in its environment (the submitted driver's). Stopping that process stops only this
    cluster (never `ray stop`, which would take down every cluster on the box). Every port is picked
    free, the dashboard agent's included: its default (52365) is taken when another cluster runs here."""
    import ray

    ray_tmp = tempfile.mkdtemp(prefix="rv", dir="/tmp")
    gcs_port, dash, metrics, agent, client = (free_port() for _ in range(5))
    proc = subprocess.Popen(
        [os.path.join(VENV_BIN, "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=8",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}"],
        stdout=subprocess.DEVNULL, stderr=open(Path(ray_tmp) / "head.err", "w"), start_new_session=True,
        # Ray gives its dashboard 60 s to come up, which a loaded 2-core box missed (the head then exits)
        env={**env(), "RAY_TMPDIR": ray_tmp, "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300"})
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{dash}/api/gcs_healthz"), 300, "the dashboard", proc)
        yield {"gcs": f"{ray.util.get_node_ip_address()}:{gcs_port}", "dashboard": f"http://127.0.0.1:{dash}",
               "metrics": metrics, "ray_tmp": Path(ray_tmp)}
    finally:  # SIGTERM, then the whole session: a graceful `ray start --block` exit took a minute here
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def job(head, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review_job")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    run = tmp / "run"
    tree = {"name": NAME, "run_dir": str(run), "model": {"policy": str(tiny_models["policy"])},
            "data": {"prompts": str(prompts), "prompts_per_step": PER_STEP},
            "rollout": {"num_workers": 1, "sampling": {"n": N, "max_new_tokens": 8, "seed": 0}},
            "reward": {"model_dir": str(tiny_models["reward"]), "http_port": free_port(), "token_env": TOKEN_ENV,
                       "feedback": {"alpha": ALPHA}},
            "learner": {"num_ranks": 1, "lr": 1e-7, "critic_lr": 1e-7, "rl": {"minibatch_size": 4, "micro_batch_size": 4}},
            # far more steps than the tests let it run: the last one ends the job with `rlhf stop`
            "loop": {"steps": 100000, "gold_function": "reward_service.functions:colour_fraction"},
            "eval": {"prompts": str(prompts), "every_steps": 3},
            "ray": {"namespace": NAME}}
    cfg = tmp / "job.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    out = tmp / "submit.out"  # `rlhf submit` follows the job's logs: the driver's output lands here
    with open(out, "w") as o:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "submit", str(cfg), "--address",
                                 head["dashboard"]], stdout=o, stderr=subprocess.STDOUT, text=True, env=env(),
                                start_new_session=True)
    try:
        wait_for(lambda: len(steps_on_disk(run)) >= 2, 500, "two steps", proc)
        url = re.search(r"review page (http://\S+)/review:", out.read_text()).group(1)
        yield {"run": run, "proc": proc, "out": out, "url": url, "address": head["gcs"], "tmp": tmp, "head": head,
               "models": tiny_models}
    finally:
        if proc.poll() is None:
            rlhf("stop", "--address", head["gcs"], "--name", NAME)
            try:
                proc.wait(240)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


@pytest.mark.timeout(900)  # with the head's start and the job's (up to 500 s to its second step on a loaded box)
def test_train_and_status_say_how_to_get_into_the_dashboard_and_the_review_page(job):
    # (a submitted driver attaches to the head, so it names no dashboard of its own; an embedded one's
    # line is checked in test_cluster_e2e)
    text = job["out"].read_text()
    assert f"review page {job['url']}/review: open {job['url']}/review?token=TOKEN once (TOKEN: `echo ${TOKEN_ENV}`)" \
        in text
    st = rlhf("status", "--address", job["address"], "--name", NAME)
    assert st.returncode == 0, st.stderr
    assert f"job {NAME} (sync): running" in st.stdout, st.stdout
    assert f"review page {job['url']}/review: open" in st.stdout
    assert f"Ray dashboard {job['head']['dashboard']} (its token prompt wants the output of `ray get-auth-token`" \
        in st.stdout, st.stdout
    assert requests.get(f"{job['url']}/review", timeout=30).status_code == 401


def test_page_lists_the_running_jobs_samples(job, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, job["url"], TOKEN)
    assert int(browser.find_element(By.CSS_SELECTOR, "#samples tbody tr.sample").get_attribute("data-step")) >= 1
    step = steps_on_disk(job["run"])[-1]
    browser.find_element(By.ID, "f-step").send_keys(str(step))
    apply_filters(browser)
    want = [(r["prompt_id"], r["sample_idx"], r["response"]) for r in sorted(
        step_rows(job["run"], step), key=lambda r: (r["prompt_id"], r["sample_idx"]))]
    got = wait(browser, lambda d: [(r.get_attribute("data-prompt-id"), int(r.get_attribute("data-sample-idx")),
                                    r.find_element(By.CSS_SELECTOR, "pre.response").text) for r in rows(d)])
    assert got == want
    prompts = [r.find_element(By.CSS_SELECTOR, "pre.prompt").text for r in rows(browser)]
    assert PROMPTS[1] in prompts and browser.execute_script("return window.__pwned === undefined")


def test_a_like_on_the_page_changes_the_next_steps_fused_reward(job, browser):
    from selenium.webdriver.common.by import By

    run = job["run"]
    row = next(r for r in rows(browser) if (r.get_attribute("data-prompt-id"), r.get_attribute("data-sample-idx"))
               == ("q0", "0"))
    step = int(row.get_attribute("data-step"))
    liked = next(r["response"] for r in step_rows(run, step) if (r["prompt_id"], r["sample_idx"]) == ("q0", 0))
    row.find_element(By.CSS_SELECTOR, "button.like").click()
    wait(browser, lambda d: "saved: like" in d.find_element(By.ID, "status").text)
    last_before = steps_on_disk(run)[-1]  # this step's scoring may have begun before the like

    def fused():  # the first step after the like whose sample of the liked response has the like fused in
        for s in steps_on_disk(run):
            hit = [r for r in step_rows(run, s) if r["response"] == liked] if s > last_before else []
            if hit and dict(hit[0]["reward_parts"])["feedback"] != 0.0:
                return s, hit[0]
    s, r = wait_for(fused, 300, "a step after the like that sampled the liked response again", job["proc"])
    assert s <= last_before + 2, (s, last_before)  # the next step scored after the like
    parts = dict(r["reward_parts"])
    assert parts["feedback"] == 1.0
    assert r["reward"] == pytest.approx(ALPHA * 1.0 + (1 - ALPHA) * parts["model"], rel=1e-5)
    before = next(x for x in step_rows(run, step) if x["response"] == liked)
    assert dict(before["reward_parts"])["feedback"] == 0.0
    labels = (run / "reward_store" / "ratings" / "labels.jsonl").read_text().splitlines()
    assert json.loads(labels[-1])["response"] == liked and json.loads(labels[-1])["label"] == 1


def test_an_ab_pick_on_the_page_lands_in_the_preference_file(job, browser):
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "f-step").clear()
    apply_filters(browser)
    a, b = [r for r in rows(browser) if r.get_attribute("data-prompt-id") == "q1"][:2]
    step = int(a.get_attribute("data-step"))
    by_idx = {x["sample_idx"]: x["response"] for x in step_rows(job["run"], step) if x["prompt_id"] == "q1"}
    chosen, rejected = by_idx[int(a.get_attribute("data-sample-idx"))], by_idx[int(b.get_attribute("data-sample-idx"))]
    a.find_element(By.CSS_SELECTOR, "button.compare").click()
    b.find_element(By.CSS_SELECTOR, "button.compare").click()
    wait(browser, lambda d: d.find_element(By.ID, "pick-a").is_enabled())
    browser.execute_script("window.scrollTo(0, 0)")
    shot = os.environ.get("RLHF_REVIEW_SCREENSHOT") or str(job["tmp"] / "review_page.png")
    browser.save_screenshot(shot)  # the README's screenshot: a running job, a comparison about to be picked
    browser.find_element(By.ID, "pick-a").click()
    wait(browser, lambda d: "saved: A is better" in d.find_element(By.ID, "status").text)
    pair = json.loads((job["run"] / "reward_store" / "ratings" / "pairs.jsonl").read_text().splitlines()[-1])
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (PROMPTS[1], chosen, rejected)


def test_reward_model_update_swaps_the_running_jobs_model_with_provenance(job, tmp_path):
    from cluster.demo.tiny_models import make_tiny_models
    from reward_service.model import RewardModel

    run = job["run"]
    new_dir = make_tiny_models(tmp_path / "next", seed=1)["reward"]
    r = rlhf("reward-model", "update", str(run), str(new_dir))
    assert r.returncode == 0 and "reward model v1" in r.stdout, r.stderr[-2000:]
    swapped = wait_for(lambda: next((s for s in steps_on_disk(run)
                                  if {x["reward_model_version"] for x in step_rows(run, s)} == {1}), None),
                    300, "a step scored by reward model v1", job["proc"])
    for step, model_dir in ((swapped, new_dir), (0, job["models"]["reward"])):
        got = step_rows(run, step)
        want = RewardModel(model_dir).score([x["prompt"] for x in got], [x["response"] for x in got])
        assert [dict(x["reward_parts"])["model"] for x in got] == pytest.approx(list(want), abs=1e-5), step
    assert {x["reward_model_version"] for x in step_rows(run, 0)} == {0}
    assert "reward model v1 <- " in job["out"].read_text()


def test_scale_up_a_killed_worker_replaced_and_scale_down(job):
    """`rlhf scale` 1 -> 2, the new worker SIGKILLed (its replacement serves the next steps), 2 -> 1; the
    samples' bookkeeping across all of it is checked once the job has stopped (the last test)."""
    run, head, proc = job["run"], job["head"], job["proc"]
    assert rlhf("scale", "--workers", "2", "--address", job["address"]).returncode == 0
    job["up"] = wait_for(lambda: next((m["step"] for m in metrics_rows(run) if m["num_workers"] == 2), None), 180,
                         "a step with 2 workers", proc)
    pid = wait_for(lambda: actor_pid(head["dashboard"], "rollout-1"), 60, "rollout-1's pid")
    os.kill(pid, signal.SIGKILL)
    killed_at = len(metrics_rows(run))
    wait_for(lambda: "rollout-2" in workers_from(run, killed_at), 240, "samples from the replacement", proc)
    assert rlhf("scale", "--workers", "1", "--address", job["address"]).returncode == 0
    down = len(metrics_rows(run))
    wait_for(lambda: any(m["num_workers"] == 1 for m in metrics_rows(run)[down:]), 120, "back to 1 worker", proc)


def test_rays_metrics_endpoint_exports_the_rl_gauges(job):
    def scrape() -> str:
        with requests.get(f"http://127.0.0.1:{job['head']['metrics']}/metrics", timeout=5) as r:
            return r.text

    text = wait_for(lambda: (t := scrape()) and "ray_rlhf_rollout_workers" in t and t, 60,
                    "RL gauges on the Prometheus endpoint")
    for gauge in ("ray_rlhf_reward_mean", "ray_rlhf_kl", "ray_rlhf_policy_version", "ray_rlhf_weight_sync_seconds",
                  "ray_rlhf_rollout_tokens_per_s", "ray_rlhf_gold_score", "ray_rlhf_sample_staleness"):
        assert f"{gauge}{{" in text, gauge


def prometheus_query(port: int, q: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(q)}"
    return requests.get(url, timeout=10).json()["data"]["result"]


def prometheus_ready(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/-/ready", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def test_prometheus_with_the_shipped_config_has_data_for_every_dashboard_panel(job, tmp_path):
    from cluster.job.gauges import EXPORTED
    from cluster.monitoring.dashboard import JSON_PATH, panel_queries

    shipped = yaml.safe_load((JSON_PATH.parent / "prometheus.yml").read_text())
    sd = shipped["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert sd == ["/tmp/ray/prom_metrics_service_discovery.json"]  # Ray's documented default
    # This cluster's Ray temp dir is RAY_TMPDIR/ray (not /tmp/ray, where other clusters on the box write);
    # a 2 s scrape interval instead of 10 s only to keep the test short.
    shipped["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(job["head"]["ray_tmp"] / "ray" / Path(sd[0]).name)]
    shipped["global"]["scrape_interval"] = "2s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(shipped))
    port = free_port()
    prom = subprocess.Popen(["/usr/bin/prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        wait_for(lambda: prometheus_ready(port), 120, "Prometheus to start", prom)
        emitted = {k for line in (job["run"] / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
        by_gauge = {name: key for key, (name, _) in EXPORTED.items()}
        checked, skipped = [], {}
        for title, expr in panel_queries(json.loads(JSON_PATH.read_text())):
            key = by_gauge[re.search(r"ray_(rlhf_\w+)\{", expr).group(1)]
            if key not in emitted:
                skipped[key] = NEVER_EMITTED.get(key, "NOT EXPECTED TO BE MISSING")
                continue
            q = expr.replace("$rlhf_job", NAME).replace("$SessionName", ".+").replace("$Cluster", ".*")
            wait_for(lambda: (lambda res: res and res[0]["metric"].get("rlhf_job") == NAME)(prometheus_query(port, q)),
                  120, f"data for panel {title!r}: {q}")
            checked.append(title)
        print(f"panels with data: {sorted(set(checked))}; skipped (gauge never set by this job): {skipped}")
        assert all(why != "NOT EXPECTED TO BE MISSING" for why in skipped.values()), skipped
        assert len(set(checked)) >= 12
    finally:
        prom.terminate()
        prom.wait(30)


def test_stop_ends_the_job_which_succeeded_checkpointed_and_kept_every_sample_once(job):
    """After `rlhf stop`: the submitted job SUCCEEDED; the report marks the reward model switch; every
    sample is in the Parquet exactly once across the scale-up, the kill -9 and the scale-down, each
    generated by the policy of its own step (sync), replacement worker included; the stop checkpointed."""
    from cluster.outputs.report import reward_model_switches
    from cluster.outputs.run_dir import RunDir

    run = job["run"]
    assert rlhf("stop", "--address", job["address"], "--name", NAME).returncode == 0
    assert job["proc"].wait(300) == 0, job["out"].read_text()[-3000:]
    assert "SUCCEEDED" in job["out"].read_text(), job["out"].read_text()[-3000:]
    metrics = RunDir(run).read_metrics()
    switches = reward_model_switches(metrics)
    assert len(switches) == 1 and switches[0][1] == 1, switches
    first_v1 = min(s for s in steps_on_disk(run) if any(x["reward_model_version"] == 1 for x in step_rows(run, s)))
    assert switches[0][0] == first_v1
    assert (run / "report.png").stat().st_size > 0 and list((run / "tb").iterdir())

    steps = len(metrics_rows(run))
    table = check_exactly_once(run, steps, per_step=PER_STEP, n=N)
    assert table.column("policy_version").to_pylist() == table.column("step").to_pylist()
    assert all(table.column("trained").to_pylist())
    step_worker = list(zip(table.column("step").to_pylist(), table.column("worker_id").to_pylist()))
    up = job["up"]  # set by the scale test
    assert min(s for s, w in step_worker if w == "rollout-1") >= up
    assert {w for s, w in step_worker if s < up} == {"rollout-0"}
    counts = [m["num_workers"] for m in metrics_rows(run)]
    assert counts[0] == 1 and 2 in counts and counts[-1] == 1, counts
    assert RunDir(run).latest_checkpoint().name == f"step={steps:06d}"  # the stop checkpointed
