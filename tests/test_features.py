"""Feature pages (jobs/features.py, saescale.features): known answers on a planted SAE over a
real cache of a real (tiny) transformer, the streamed sketch against a brute-force computation
(in process and on Ray Data, with different block counts), bad input, and the viewer in a real
headless Chromium (Debian's, driven by Playwright), live mode included."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from saescale.core.config import SAEConfig
from saescale.core.model import TopKSAE
from saescale.data.format import POS_STRIDE
from saescale.data.reader import ActivationCache
from saescale.features.contexts import SketchWork, merge_sketches
from saescale.features.passes import InMemorySAE, LocalRunner
from saescale.features.sketch import HIST_EDGES, sample_keys
from saescale.formats.saved import save_sae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
N_LATENTS, PLANTED = 16, 5


@pytest.fixture(scope="module")
def planted(tiny_model_dir, tmp_path_factory):
    """A cache of the tiny Llama (layer 0, 32-token windows) and an SAE whose latent PLANTED is
    wired to one token: its encoder row separates that token's rows from all others (fitted on the
    cache, the margin checked), its decoder row is that token's unembedding over the final norm's
    gain (so it promotes that token most). k = n_latents: a latent fires exactly when its
    pre-activation is positive."""
    from saescale.data.builder import CacheConfig, build_cache
    from saescale.lm.models import load_causal_lm

    root = tmp_path_factory.mktemp("features")
    cache_url = str(root / "cache")
    build_cache(
        CacheConfig(
            model=tiny_model_dir,
            corpus="embedded:shakespeare",
            output=cache_url,
            layer=0,
            context_length=32,
            max_tokens=3000,
            rows_per_shard=600,
            use_ray=False,
        ),
        progress=lambda _: None,
    )
    cache = ActivationCache(cache_url)
    tables = [cache.read_table(s) for s in range(len(cache.manifest.shards))]
    acts = torch.cat([cache.read_shard(s) for s in range(len(tables))]).float()
    tokens = torch.tensor(np.concatenate([t.column("token_id").to_numpy() for t in tables]))
    values, counts = tokens.unique(return_counts=True)
    lm = load_causal_lm(tiny_model_dir)
    target = None
    for t in values[counts.argsort(descending=True)].tolist():  # the most frequent separable token
        mask = tokens == t
        w = acts[mask].mean(0) - acts[~mask].mean(0)
        score = acts @ w
        low, high = score[mask].min(), score[~mask].max()
        if low > high and int(mask.sum()) >= 25:
            target, bias = t, -float(low + high) / 2
            break
    assert target is not None, "no token's rows are linearly separable in the tiny model's layer 0"
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=acts.shape[1], n_latents=N_LATENTS, k=N_LATENTS, normalization="none"))
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)
        sae.W_enc[PLANTED] = w
        sae.b_enc[PLANTED] = bias
        gain = lm.model.model.norm.weight.detach()
        sae.W_dec[PLANTED] = lm.model.get_output_embeddings().weight[target].detach() / gain
    sae_url = str(root / "sae")
    meta = {"model_name": tiny_model_dir, "hook_name": "resid_post.0", "cache": cache_url}
    save_sae(sae, sae_url, meta)
    return {
        "root": root,
        "cache": cache_url,
        "sae": sae_url,
        "sae_obj": sae,
        "target": target,
        "text": lm.tokenizer.decode([target]),
        "count": int((tokens == target).sum()),
        "rows": len(tokens),
        "model": tiny_model_dir,
    }


def run_job(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "features.py"), "run_name=planted", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def pages(planted):
    """The job run once on the planted SAE over all shards (what the known-answer and browser
    tests read): real CLI, wandb offline, the Neuronpedia export on."""
    out = planted["root"] / "pages"
    env = dict(os.environ, WANDB_SILENT="true")
    proc = run_job(
        f"sae={planted['sae']}",
        f"output_dir={out}",
        "features.shards=all",
        "features.neuronpedia=true",
        "explain.latents=3",
        "explain.test_windows=40",
        "wandb.mode=offline",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def read_jsonl_gz(path) -> list[dict]:
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle]


def test_planted_latent_has_the_known_statistics_contexts_logits_and_explanation(planted, pages):
    f = json.loads((pages / "latents" / f"{PLANTED}.json").read_text())
    windows = json.loads((pages / "windows.json").read_text())
    target, text = planted["target"], planted["text"]
    # fires exactly on its token: density is that token's share of the cache's rows
    assert f["density"] == pytest.approx(planted["count"] / planted["rows"], rel=1e-5)
    assert sum(f["histogram"]["counts"]) == planted["count"]
    assert len(f["top"]) == 20 and len({ex["window"] for ex in f["top"]}) == 20  # one example per window
    assert [ex["act"] for ex in f["top"]] == sorted((ex["act"] for ex in f["top"]), reverse=True)
    cache = ActivationCache(planted["cache"])
    ids = cache.windows().column("token_ids").to_pylist()
    for ex in f["top"] + f["samples"]:
        assert windows[str(ex["window"])][ex["pos"]] == text
        # its activation at every token of the window: nonzero exactly where the token is
        # (position 0 is BOS, which the cache dropped)
        expected = [p for p, t in enumerate(ids[ex["window"]]) if t == target and p > 0]
        assert sorted(p for p, _ in ex["acts"]) == expected
    assert 0 < len(f["samples"]) <= 25 and {s["bin"] for s in f["samples"]} <= set(range(5))
    assert f["logits"]["promoted"][0][0] == text  # its decoder row is that token's unembedding
    e = f["explanation"]
    assert e is not None and e["patterns"][0].startswith(text)
    assert e["precision"] == 1.0 and e["recall"] == 1.0
    assert len(f["neighbours"]) == 8 and PLANTED not in [n for n, _ in f["neighbours"]]
    index = json.loads((pages / "index.json").read_text())
    assert index["shown"] == N_LATENTS and len(index["features"]) == N_LATENTS
    row = next(r for r in index["features"] if r["latent"] == PLANTED)
    assert row["top_tokens"] == [text] and row["promoted"][0] == text
    # the Neuronpedia export, with its field names
    [model_dir] = os.listdir(pages / "neuronpedia")
    [source] = os.listdir(pages / "neuronpedia" / model_dir)
    base = pages / "neuronpedia" / model_dir / source
    feats = read_jsonl_gz(base / "features" / "batch-0.jsonl.gz")
    mine = next(r for r in feats if r["index"] == str(PLANTED))
    assert mine["pos_str"][0] == text and mine["frac_nonzero"] == f["density"] and len(mine["vector"]) == 48
    acts = read_jsonl_gz(base / "activations" / "batch-0.jsonl.gz")
    first = next(a for a in acts if a["index"] == str(PLANTED))
    assert first["tokens"][first["maxValueTokenIndex"]] == text and first["maxValue"] == f["top"][0]["act"]
    # the wandb feature cards, in the offline run
    tables = [
        os.path.join(d, n)
        for d, _, names in os.walk(planted["root"])
        for n in names
        if n.endswith(".table.json") and "cards" in n
    ]
    with open(tables[0]) as handle:
        assert json.load(handle)["columns"][0] == "latent"


def test_job_on_ray_data_reads_and_writes_object_storage(planted, pages, s3_bucket, s3_endpoint):
    """sae=<s3 url> data.cache=<s3 url> output_dir=<s3 url>, the passes on Ray Data (an embedded
    local Ray here; RAY_ADDRESS under `ray job submit`): the same pages as the local run's."""
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    fs.put(planted["cache"], f"{bucket}/cache", recursive=True)
    fs.put(planted["sae"], f"{bucket}/sae", recursive=True)
    proc = run_job(
        f"sae={bucket}/sae",
        f"data.cache={bucket}/cache",
        f"data.endpoint_url={s3_endpoint}",
        f"output_dir={bucket}/pages",
        "features.shards=all",
        f"features.latents=[{PLANTED},3]",
        "explain.latents=0",
        "runner.ray=true",
        "wandb.mode=disabled",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on Ray Data" in proc.stdout
    remote = json.loads(fs.cat(f"{bucket}/pages/latents/{PLANTED}.json"))
    local = json.loads((pages / "latents" / f"{PLANTED}.json").read_text())
    for key in ("density", "mean", "mean_sq", "max", "histogram", "top", "samples", "logits", "neighbours"):
        assert remote[key] == local[key], key
    assert fs.exists(f"{bucket}/pages/index.html") and fs.exists(f"{bucket}/pages/viewer.js")
    assert sorted(json.loads(fs.cat(f"{bucket}/pages/index.json"))["chunk_of"]) == ["3", str(PLANTED)]


def test_an_imported_sae_gets_the_same_pages(planted, pages, tmp_path):
    """From any trained or imported SAE: the planted SAE as a sparsify folder (formats.imports)
    gives the planted latent the same statistics and examples."""
    from saescale.formats.convert import convert_sae

    convert_sae(planted["sae"], str(tmp_path / "sparsify"), "sparsify")
    out = tmp_path / "pages"
    proc = run_job(
        f"sae={tmp_path / 'sparsify'}",
        f"data.cache={planted['cache']}",  # a peer folder does not name its cache
        f"output_dir={out}",
        "features.shards=all",
        f"features.latents=[{PLANTED}]",
        "explain.latents=0",
        "wandb.mode=disabled",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = json.loads((out / "latents" / f"{PLANTED}.json").read_text())
    ours = json.loads((pages / "latents" / f"{PLANTED}.json").read_text())
    assert imported["density"] == ours["density"] and imported["histogram"] == ours["histogram"]
    assert [(e["window"], e["pos"]) for e in imported["top"]] == [(e["window"], e["pos"]) for e in ours["top"]]
    assert imported["logits"]["promoted"][0] == ours["logits"]["promoted"][0]


def brute_force(sae: TopKSAE, cache: ActivationCache, shards: list[int], top: int, sample: int, seed: int) -> dict:
    """Everything the sketch keeps, from the dense [rows, n] activations of all rows at once."""
    tables = [cache.read_table(s) for s in shards]
    acts = torch.cat([cache.read_shard(s) for s in shards]).float()
    window = np.concatenate([t.column("window").to_numpy() for t in tables]).astype(np.int64)
    pos = np.concatenate([t.column("pos").to_numpy() for t in tables]).astype(np.int64)
    with torch.no_grad():
        dense = sae.dense_latents(acts).numpy().astype(np.float64)
    out = {"tokens": len(acts), "latent": {}}
    for la in range(dense.shape[1]):
        a = dense[:, la]
        on = np.flatnonzero(a > 0)
        best: dict[int, tuple[float, int]] = {}
        for i in on:
            if int(window[i]) not in best or a[i] > best[int(window[i])][0]:
                best[int(window[i])] = (a[i], int(pos[i]))
        tops = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
        rows = window[on] * POS_STRIDE + pos[on]
        keys = sample_keys(rows, np.full(len(on), la), seed)
        chosen = np.argsort(keys, kind="stable")[:sample]
        out["latent"][la] = {
            "fires": len(on),
            "moments": [float((a**p).sum()) for p in (1, 2, 3, 4)],
            "hist": np.histogram(np.clip(a[on], HIST_EDGES[0], HIST_EDGES[-1] * 0.999), HIST_EDGES)[0],
            "top": [(w, p, v) for w, (v, p) in tops],
            "sample": sorted(int(r) for r in rows[chosen]),
        }
    return out


def assert_sketch_matches(sketch, expected: dict) -> None:
    assert sketch.tokens == expected["tokens"]
    for slot, la in enumerate(sketch.latents.tolist()):
        want = expected["latent"][la]
        assert sketch.fires[slot] == want["fires"]
        np.testing.assert_allclose(sketch.moments[slot], want["moments"], rtol=1e-4)
        np.testing.assert_array_equal(sketch.hist[slot], want["hist"])
        got = sketch.top_of(la)
        assert [w for w, _, _ in got] == [w for w, _, _ in want["top"]], la
        np.testing.assert_allclose([v for *_, v in got], [v for *_, v in want["top"]], rtol=1e-5)
        assert sorted(sketch.smp_row[sketch.smp_lat == la].tolist()) == want["sample"]


@pytest.fixture(scope="module")
def random_sae(planted):
    """An SAE with 64 latents and k=8 (latents compete for the top k), random but trained-like."""
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(d_in=48, n_latents=64, k=8, normalization="none"))
    with torch.no_grad():
        sae.b_enc.uniform_(-0.5, 0.5)
    return sae


def test_streamed_sketch_equals_brute_force_in_process_for_any_block_size(planted, random_sae):
    cache = ActivationCache(planted["cache"])
    shards = list(range(len(cache.manifest.shards)))
    latents = np.arange(64)
    expected = brute_force(random_sae, cache, shards, top=6, sample=10, seed=3)
    for rows_per_block in (None, 256, 150):  # a shard a block, and blocks that straddle nothing alike
        work = SketchWork(InMemorySAE(random_sae), latents, 6, 10, 3)
        sketch = merge_sketches(LocalRunner(cache, rows_per_block, progress=False).run(work, shards, "test"))
        assert_sketch_matches(sketch, expected)
    # the context pass: the same activations whatever the blocks
    from saescale.features.contexts import ContextWork, gather_contexts, pair_keys

    wins = np.array([w for la in (3, 17) for w, _, _ in expected["latent"][la]["top"]])
    lats = np.array([la for la in (3, 17) for _ in expected["latent"][la]["top"]])
    pairs = np.unique(pair_keys(wins, lats, 64))
    gathered = [
        gather_contexts(
            LocalRunner(cache, rows, progress=False).run(ContextWork(InMemorySAE(random_sae), pairs, 64), shards, "t"),
            32,
        )
        for rows in (None, 150)
    ]
    assert gathered[0].row == gathered[1].row and len(gathered[0].row) == len(pairs)
    np.testing.assert_allclose(gathered[0].dense, gathered[1].dense, rtol=1e-5)
    for w, la in zip(wins.tolist(), lats.tolist()):  # each top window's activation shows at its position
        top_pos, top_val = next((p, v) for ww, p, v in expected["latent"][la]["top"] if ww == w)
        assert gathered[0].get(w, la)[top_pos] == pytest.approx(top_val, rel=1e-5)
    # a latent subset keeps exactly those latents' summaries
    subset = np.array([3, 17, 40])
    work = SketchWork(InMemorySAE(random_sae), subset, 6, 10, 3)
    sketch = merge_sketches(LocalRunner(cache, 300, progress=False).run(work, shards, "test"))
    assert sketch.latents.tolist() == [3, 17, 40] and set(sketch.top_lat.tolist()) <= {3, 17, 40}
    assert_sketch_matches(sketch, expected)


def test_streamed_sketch_on_ray_data_equals_brute_force(planted, random_sae, tmp_path):
    import ray

    from saescale.service.feature_pass import RayDataRunner, SavedSAE
    from saescale.service.ray_local import ensure_ray

    url = str(tmp_path / "random-sae")
    save_sae(random_sae, url)
    cache = ActivationCache(planted["cache"])
    shards = list(range(len(cache.manifest.shards)))
    expected = brute_force(random_sae, cache, shards, top=6, sample=10, seed=3)
    assert ensure_ray(num_cpus=3) is not None, "this process was connected to a Ray already"
    try:
        for rows_per_block, actors in ((None, 1), (200, 2)):
            runner = RayDataRunner(planted["cache"], cache.manifest, None, "rebuild it", rows_per_block, actors)
            work = SketchWork(SavedSAE(url), np.arange(64), 6, 10, 3)
            parts = list(runner.run(work, shards, "test"))
            assert len(parts) >= len(shards)  # a summary per block, merged here
            assert_sketch_matches(merge_sketches(parts), expected)
        with pytest.raises(ValueError, match="needs 4 CPUs in the Ray cluster"):  # not a silent hang
            next(RayDataRunner(planted["cache"], cache.manifest, None, "", None, 3).run(work, shards, "test"))
    finally:
        ray.shutdown()


def test_bad_input_is_one_line_exit_2_and_writes_nothing(planted, tmp_path):
    """A run with no SAE, a cache of another hook than the SAE's, an empty latent subset."""
    other = tmp_path / "other-hook-sae"
    sae = planted["sae_obj"]
    save_sae(sae, str(other), {"model_name": planted["model"], "hook_name": "resid_post.1", "cache": planted["cache"]})
    cases = {
        "no SAE": ([f"sae={tmp_path / 'missing'}"], "no cfg.json"),
        "other hook": ([f"sae={other}"], "trained on hook resid_post.1 but the cache"),
        "empty subset": ([f"sae={planted['sae']}", "features.latents=[]"], "features.latents is an empty list"),
        # the pages replace output_dir whole: never a folder of something else (here the SAE itself)
        "output is the SAE": ([f"sae={planted['sae']}", f"output_dir={planted['sae']}"], "other than feature pages"),
    }
    procs = {}
    for name, (args, _) in cases.items():  # in parallel: each is a fresh interpreter
        out = tmp_path / name.replace(" ", "-")
        cmd = [sys.executable, os.path.join(ROOT, "jobs", "features.py"), "run_name=x", f"output_dir={out}", *args]
        # (a later output_dir= in args wins)
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)
    for name, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, stderr[-2000:])
        assert lines[-1].startswith("error: ") and cases[name][1] in lines[-1], (name, lines[-3:])
        assert "Traceback" not in stderr and not out.exists(), name
    assert sorted(os.listdir(planted["sae"])) == ["cfg.json", "sae.safetensors"]  # untouched


# ----------------------------------------------------------------------------- the browser
def launch_chromium(playwright):
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: `make browser` installs Debian's chromium"
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )


def not_blank(png: bytes) -> bool:
    import io

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    return pixels.std() > 5


def test_viewer_in_a_real_browser_from_disk(planted, pages):
    from playwright.sync_api import sync_playwright

    text = planted["text"]
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"file://{pages}/index.html")  # from disk: no server, no network
        page.wait_for_selector("table.list tr.row")
        assert page.locator("tr.row").count() == N_LATENTS
        assert not_blank(page.screenshot())
        # sorted by density, then by latent id on a header click
        page.click("th[data-key=latent]")
        assert page.locator("tr.row").first.get_attribute("data-id") == "0"
        # search by the token the planted latent fires on
        page.fill("#search", text.strip() or text)
        rows = page.locator("tr.row")
        assert PLANTED in [int(rows.nth(i).get_attribute("data-id")) for i in range(rows.count())]
        page.fill("#search", f"#{PLANTED}")
        assert page.locator("tr.row").count() == 1
        page.locator("tr.row").first.click()
        page.wait_for_selector(f".feature[data-latent='{PLANTED}'] #top .ctx")
        highlighted = page.locator("#top .tok.on")
        assert highlighted.count() >= 20 and highlighted.first.inner_text() == text.replace("\n", "\u21b5")
        assert page.locator("svg.hist rect").count() > 0
        assert not_blank(page.screenshot())
        # keyboard: / focuses search; Escape goes back; j/k walk the list in its order
        page.fill("#search", "")
        page.goto(f"file://{pages}/index.html#/feature/0")
        page.wait_for_selector(".feature[data-latent='0']")
        page.evaluate("document.activeElement.blur()")  # keys typed into the search box do not navigate
        page.keyboard.press("j")
        page.wait_for_function("location.hash !== '#/feature/0'")
        after_j = page.evaluate("location.hash")
        page.keyboard.press("k")
        page.wait_for_function("location.hash === '#/feature/0'")
        page.keyboard.press("/")
        assert page.evaluate("document.activeElement.id") == "search"
        page.keyboard.press("Escape")
        page.wait_for_selector("table.list")
        assert after_j.startswith("#/feature/") and errors == []
        browser.close()


def test_live_mode_shows_the_planted_latent_firing_on_typed_text(planted, pages):
    from playwright.sync_api import sync_playwright

    from saescale.features.live import LiveEncoder
    from saescale.features.server import make_server
    from saescale.lm.models import load_causal_lm

    lm = load_causal_lm(planted["model"])
    live = LiveEncoder(lm.model, lm.tokenizer, planted["sae_obj"], "resid_post", 0, max_tokens=64)
    with pytest.raises(ValueError, match="the limit is 64"):
        live.run("word " * 100)
    server = make_server(str(pages), port=0, live=live)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    before = sorted(os.listdir(pages))
    try:
        import http.client

        def post(body: bytes, headers: dict) -> tuple[int, dict]:
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request("POST", "/api/live", body=body, headers=headers)
            answer = conn.getresponse()
            return answer.status, json.loads(answer.read())

        json_type = {"Content-Type": "application/json"}
        assert post(b'{"text": "a"}', {"Content-Type": "text/plain"})[0] == 415
        assert post(b"{not json", json_type)[0] == 400
        assert post(b'{"text": ""}', json_type) == (400, {"error": "type some text first"})
        assert post(b"{}", {**json_type, "Content-Length": "-1"})[0] == 400
        status, body = post(json.dumps({"text": planted["text"]}).encode(), json_type)
        assert status == 200 and body["tokens"][1:] == [planted["text"]]
        assert PLANTED in [latent for latent, _ in body["latents"][1]] and body["latents"][0] == []  # BOS: none
        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page()
            page.goto(f"http://{host}:{port}/#/live")
            page.wait_for_selector("#live-text")
            page.fill("#live-text", f"To be or not{planted['text']}to be{planted['text']}")
            page.click("#live-run")
            page.wait_for_selector(".live-tok")
            tokens = page.locator(".live-tok")
            shown = [tokens.nth(i).inner_text() for i in range(tokens.count())]
            at = shown.index(planted["text"].replace("\n", "\u21b5"))
            tokens.nth(at).click()
            link = page.locator(f"#live-latents a[href='#/feature/{PLANTED}']")
            assert link.count() == 1
            link.click()
            page.wait_for_selector(f".feature[data-latent='{PLANTED}']")
            # too long a text: the error is shown, nothing breaks
            page.goto(f"http://{host}:{port}/#/live")
            page.fill("#live-text", "word " * 100)
            page.click("#live-run")
            page.wait_for_selector("#live-status .error")
            assert "limit is 64" in page.inner_text("#live-status")
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(os.listdir(pages)) == before  # live mode writes nothing


def test_decoder_neighbours_scanned_in_chunks_equal_the_dense_cosine_matrix():
    from saescale.features.effects import decoder_neighbours

    torch.manual_seed(2)
    sae = TopKSAE(SAEConfig(d_in=12, n_latents=37, k=4))
    w = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cos = w @ w.t()
    cos.fill_diagonal_(-9)
    got = decoder_neighbours(sae, [0, 5, 36], top=6, chunk=5)
    for latent, row in zip([0, 5, 36], got):
        want = cos[latent].topk(6)
        assert [i for i, _ in row] == want.indices.tolist()
        np.testing.assert_allclose([c for _, c in row], want.values.tolist(), rtol=1e-5)
    # more neighbours asked for than there are other latents: all the others, never itself
    small = TopKSAE(SAEConfig(d_in=12, n_latents=4, k=2))
    assert [sorted(i for i, _ in row) for row in decoder_neighbours(small, [0, 3], top=8)] == [[1, 2, 3], [0, 1, 2]]


def test_logit_effects_go_through_the_final_norm_gain_and_the_unembedding(tiny_model_dir):
    from saescale.features.effects import logit_directions, logit_effects
    from saescale.lm.models import load_causal_lm

    lm = load_causal_lm(tiny_model_dir)
    torch.manual_seed(3)
    sae = TopKSAE(SAEConfig(d_in=48, n_latents=8, k=2))
    gain = lm.model.model.norm.weight.detach()
    unembed = lm.model.get_output_embeddings().weight.detach()
    want = (sae.W_dec.detach() * gain) @ unembed.t()  # Llama's RMSNorm: a gain, no mean subtraction
    torch.testing.assert_close(logit_directions(lm.model, sae.W_dec.detach()), want)
    effects = logit_effects(lm.model, sae, [2, 6], top=5, chunk=1)
    for latent, e in zip([2, 6], effects):
        assert [t for t, _ in e["promoted"]] == want[latent].topk(5).indices.tolist()
        assert [t for t, _ in e["suppressed"]] == (-want[latent]).topk(5).indices.tolist()
