# ---------------------------------------------------------------------------
# The browser page of pyoco serve
# ---------------------------------------------------------------------------
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import pyoco

PAGE_FLOW = textwrap.dedent('''
    import time
    from pyoco import task, Flow

    @task
    def extract(ctx):
        time.sleep(0.05)
        print("extracted 3 files")
        return ["a.csv", "b.csv", "c.csv"]

    @task(retries=2, retry_delay=0.05)
    def clean(ctx, path):
        time.sleep(0.04)
        if path == "b.csv" and ctx.attempt == 1:
            raise ValueError("flaky disk")
        return path

    @task
    def load(ctx, clean):
        time.sleep(0.03)
        ctx.save_artifact("report.txt", "rows: 42\\n")
        return len(clean)

    @task(fail_policy="isolate")
    def notify(ctx, extract):
        time.sleep(0.02)
        raise ConnectionError("mail server said no")

    @task
    def archive(ctx, notify):
        return True

    flow = Flow("nightly_etl")
    flow >> extract >> clean.map("$node.extract.output") >> load
    flow.add(notify, after=[extract])
    flow.add(archive, after=[notify])
''')


def page_get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


@pytest.fixture(scope="module")
def page_site(tmp_path_factory):
    """A store with one run that fans out, retries and fails, and a server over it."""
    folder = tmp_path_factory.mktemp("page")
    flow_file = folder / "etl.py"
    flow_file.write_text(PAGE_FLOW)
    store = folder / "store"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent), PYOCO_CUTE="0")
    done = subprocess.run([sys.executable, "-m", "pyoco", "run", str(flow_file), "--store",
                           str(store)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    run_id = pyoco.RunStore(store).ids()[0]
    server = pyoco.Server(store, port=0).start()
    yield server.url, run_id, store
    server.close()


def test_page_is_one_self_contained_document(page_site):
    url, run_id, _ = page_site
    for path in ("/", "/runs/%s/view" % run_id):
        status, headers, body = page_get(url + path)
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        text = body.decode("utf-8")
        assert "<script>" in text and "<style>" in text
        # Nothing is fetched from elsewhere: no CDN, no external script or style.
        for marker in ('src="http', "src='http", 'href="http', "@import", "//cdn"):
            assert marker not in text


def test_graph_endpoint_gives_the_runs_dag_with_map_instances(page_site):
    url, run_id, _ = page_site
    _, _, body = page_get("%s/runs/%s/graph" % (url, run_id))
    graph = json.loads(body)
    assert graph["run_id"] == run_id
    assert set(graph["nodes"]) == {"extract", "clean", "load", "notify", "archive",
                                   "clean[0]", "clean[1]", "clean[2]"}
    edges = {tuple(e) for e in graph["edges"]}
    assert {("extract", "clean"), ("clean", "load"), ("extract", "notify"),
            ("notify", "archive"), ("clean", "clean[1]")} <= edges


def test_graph_of_unknown_run_is_404(page_site):
    url, _, _ = page_site
    with pytest.raises(urllib.error.HTTPError) as caught:
        page_get(url + "/runs/20000101-000000-00000000/graph")
    assert caught.value.code == 404
    assert "error" in json.loads(caught.value.read())


def test_artifact_is_served_inert_and_paths_cannot_escape(page_site):
    url, run_id, store = page_site
    status, headers, body = page_get("%s/runs/%s/artifacts/report.txt" % (url, run_id))
    assert status == 200 and body == b"rows: 42\n"
    assert headers["Content-Security-Policy"] == "sandbox"
    assert headers["X-Content-Type-Options"] == "nosniff"
    secret = Path(store) / "runs" / run_id / "run.json"
    assert secret.exists()
    for bad in ("..%2Frun.json", "%2E%2E/run.json", "nope.txt", "..%2F..%2F..%2Fetc%2Fpasswd"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            page_get("%s/runs/%s/artifacts/%s" % (url, run_id, bad))
        assert caught.value.code == 404, bad


def test_record_tells_the_page_everything_it_draws(page_site):
    # The page computes nothing the API cannot tell: states, times, attempts,
    # retries (as events), errors and tracebacks, artifacts.
    url, run_id, _ = page_site
    _, _, body = page_get("%s/runs/%s" % (url, run_id))
    record = json.loads(body)
    tasks = record["tasks"]
    assert tasks["clean[1]"]["attempts"] == 2
    assert any(e["event"] == "task.retrying" and e["task"] == "clean[1]" for e in record["events"])
    assert tasks["notify"]["state"] == "FAILED"
    assert "ConnectionError: mail server said no" in tasks["notify"]["traceback"]
    assert "pyoco.py" not in tasks["notify"]["traceback"].splitlines()[1]
    assert tasks["archive"]["state"] == "SKIPPED"
    assert "report.txt" in tasks["load"]["artifacts"]
    for name in ("extract", "clean[0]", "clean[1]", "clean[2]", "load"):
        assert tasks[name]["started_at"] and tasks[name]["ended_at"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def page_browser(url, *extra):
    profile = tempfile.mkdtemp(prefix="pyoco-chromium-")
    try:
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--user-data-dir=" + profile, "--virtual-time-budget=5000",
             "--window-size=1280,1300", *extra, url],
            capture_output=True, text=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return done


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_browser_renders_run_list_and_timeline(page_site, tmp_path):
    url, run_id, _ = page_site
    listing = page_browser(url + "/", "--dump-dom")
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert 'id="runs"' in listing.stdout
    assert 'data-run="%s"' % run_id in listing.stdout

    view = page_browser("%s/runs/%s/view" % (url, run_id), "--dump-dom")
    dom = view.stdout
    assert 'id="timeline"' in dom
    for name in ("extract", "clean[0]", "clean[1]", "clean[2]", "load", "notify", "archive"):
        assert 'class="tl-row" data-task="%s"' % name in dom
    assert 'data-task="clean[1]" data-state="SUCCEEDED"' in dom
    assert 'data-task="notify" data-state="FAILED"' in dom
    assert 'data-task="archive" data-state="SKIPPED"' in dom
    assert 'class="tl-tick"' in dom                      # the retry of clean[1]
    assert 'id="dag"' in dom and "mail server said no" in dom
    assert "/runs/%s/artifacts/report.txt" % run_id in dom

    shot = tmp_path / "page.png"
    done = page_browser("%s/runs/%s/view" % (url, run_id), "--screenshot=%s" % shot)
    assert done.returncode == 0 and shot.stat().st_size > 10000
    target = os.environ.get("PYOCO_UPDATE_SCREENSHOT")
    if target:                      # how docs/serve-page.png is made
        shutil.copyfile(shot, target)
