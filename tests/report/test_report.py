"""The report of a finished run: its files, figures and data agree with the run; missing inputs are left out
with the reason; damaged ones are clear errors that keep the previous report."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from _procs import child_env
from crossjax import crosscoder, crosscoder_export, train
from crossjax.analysis import evolution
from crossjax.errors import CrossjaxError
from crossjax.report import write_report

FIGURES = ("strength", "emergence", "clusters", "rotation", "heldout", "separability")


def read_data(report: str, kind: str, n: int = 0):
    """The value a data/<kind>/ script (or data/meta.js) passes to crossjaxData."""
    path = os.path.join(report, "data", "meta.js") if kind == "meta" else \
        os.path.join(report, "data", kind, f"{kind}_{n:05d}.js")
    text = open(path, encoding="utf-8").read().strip()
    head = f'crossjaxData("{kind}",{n},'
    assert text.startswith(head) and text.endswith(");"), path
    return json.loads(text[len(head):-2])


def all_rows(report: str) -> list[list]:
    meta = read_data(report, "meta")
    return [r for p in range(meta["num_pages"]) for r in read_data(report, "table", p)]


def column(report: str, key: str) -> list:
    keys = [c["key"] for c in read_data(report, "meta")["columns"]]
    return [r[keys.index(key)] for r in all_rows(report)]


def assert_png(path: str) -> None:
    from PIL import Image
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_report_files_figures_and_table_agree_with_the_run(copy_run):
    index = write_report(copy_run, progress=False)
    report = os.path.dirname(index)
    assert index == os.path.join(copy_run, "report", "index.html")
    for name in FIGURES:
        assert_png(os.path.join(report, "plots", f"{name}.png"))
    assert not os.path.exists(os.path.join(report, "plots", "ev_l0.png"))      # no compare.json in this run
    page = open(index, encoding="utf-8").read()
    assert 'id="plot-ev_l0"' in page and "no compare.json" in page
    assert "http://" not in page and "https://" not in page                    # nothing from the network

    from crossjax.summary import RunSummary
    summary = RunSummary.read(copy_run)
    params, _, _ = crosscoder_export.load_exported(os.path.join(copy_run, "export"))
    norms = evolution.decoder_norms(params["W_dec"])
    meta = read_data(report, "meta")
    assert meta["num_features"] == summary.num_features == len(all_rows(report))
    assert column(report, "kind") == evolution.classify_kinds(norms).tolist()
    assert column(report, "emerges") == evolution.emergence_snapshot(norms).tolist()
    clusters = [c for c in column(report, "cluster") if c is not None]
    assert np.bincount(clusters).tolist() == summary.evolution["clusters"]["sizes"]
    sep = summary.evals["separability"]
    rho = column(report, "separability")
    for f, r in zip(sep["features"], sep["spearman"]):
        assert rho[f] == (None if np.isnan(r) else r)          # NaN (a constant curve): no figure in the table
    assert sum(r is not None for r in rho) == int(np.isfinite(sep["spearman"]).sum())
    freq = column(report, "frequency")
    assert all(0 <= v <= 1 for v in freq) and max(freq) > 0
    # every feature has a record with its strength curve; the separability sample has its AUC curve
    record = read_data(report, "feature", 0)
    assert len(record) == summary.num_features
    np.testing.assert_allclose([r["s"] for r in record], evolution.normalised_strength(norms).T, atol=1e-4)
    for i, f in enumerate(sep["features"]):
        np.testing.assert_allclose(record[f]["auc"], sep["auc"][i], atol=1e-3)
        assert record[f]["ctx"] is not None                                    # its page shows contexts


def test_contexts_per_snapshot_equal_a_brute_force_pass(copy_run, finished_run):
    """Each snapshot's top contexts are the rows with the largest activation f[b, s, i] over the whole store."""
    import jax.numpy as jnp

    from crossjax.store import ActivationStore
    export = os.path.join(copy_run, "export")
    params, scales, cfg = crosscoder_export.load_exported(export)
    store = ActivationStore.open(finished_run[1])
    x = store.read_rows(0, store.num_rows)
    h = np.asarray(crosscoder.encode({k: jnp.asarray(v) for k, v in params.items()},
                                     crosscoder.normalize(x, scales)))                       # [N, F]
    # weaken features 0-15 at snapshot 0 and 16-31 at snapshot 1 so that their gate h n > theta opens on only
    # their top 2 (snapshot 0) or 4 (snapshot 1) rows there
    theta = np.exp(params["log_threshold"])
    for s, features, keep in ((0, range(16), 2), (1, range(16, 32), 4)):
        for f in features:
            top = np.sort(h[:, f])[::-1]
            w = params["W_dec"][s, f]
            params["W_dec"][s, f] = w / np.linalg.norm(w) * theta[f] / ((top[keep - 1] + top[keep]) / 2)
    crosscoder_export.export_params(params, scales, cfg, export)
    report = os.path.dirname(write_report(copy_run, contexts_per_snapshot=6, progress=False))
    p = {k: jnp.asarray(v) for k, v in params.items()}
    acts = np.asarray(crosscoder.activate(p, crosscoder.encode(p, crosscoder.normalize(x, scales)), cfg))  # [N,S,F]
    records = read_data(report, "feature", 0)
    checked = partial = 0
    for f, rec in enumerate(records):
        if rec["ctx"] is None:
            continue
        partial += 0 < min(rec["ctx"]["fires"]) < len(rec["ctx"]["ex"])
        for s in range(cfg.num_snapshots):
            a = acts[:, s, f]
            firing = np.flatnonzero(a > 0)
            want = firing[np.lexsort((firing, -a[firing]))][:6]
            got = [e[0] for e in rec["ctx"]["ex"][:rec["ctx"]["fires"][s]]]
            assert got == want.tolist(), (f, s)
            checked += 1
    assert checked >= 5 * cfg.num_snapshots and partial >= 20     # some snapshots keep only some of the top rows
    # the firing token is the row's stored token (planted stores: the row id)
    ex = next(r for r in records if r["ctx"] and r["ctx"]["ex"])["ctx"]["ex"][0]
    assert ex[3] == f"#{int(store.read_tokens(ex[0], ex[0] + 1)['token_ids'][0])}"


def test_compare_json_adds_the_ev_l0_figure_and_a_bad_one_is_left_out(copy_run):
    from crossjax.summary import RunSummary
    summary = RunSummary.read(copy_run)
    s = len(summary.snapshots)
    good = {"snapshots": summary.snapshots, "crosscoder": {"ev": summary.heldout["ev"], "l0": summary.heldout["l0"]},
            "sae": {"ev": [0.5] * s, "l0": [3.0] * s}, "store": summary.store, "steps": summary.steps}
    path = os.path.join(copy_run, "compare.json")
    with open(path, "w") as f:
        json.dump(good, f)
    report = os.path.dirname(write_report(copy_run, contexts=False, progress=False))
    assert_png(os.path.join(report, "plots", "ev_l0.png"))

    for damage, message in ((lambda t: t[: len(t) // 2], "unreadable"),
                            (lambda t: t.replace(f'"steps": {summary.steps}', '"steps": 7'), "from another run")):
        with open(path, "w") as f:
            f.write(damage(json.dumps(good)))
        index = write_report(copy_run, contexts=False, progress=False)
        assert not os.path.exists(os.path.join(os.path.dirname(index), "plots", "ev_l0.png"))
        page = open(index, encoding="utf-8").read()
        assert message in page and "python -m crossjax.compare" in page


def test_figures_without_their_inputs_are_skipped_with_the_reason(copy_run):
    path = os.path.join(copy_run, "summary.json")
    raw = json.load(open(path))
    raw["evals"] = {}                                   # no held-out evaluation, no separability
    raw["evolution"]["clusters"] = {"k": 0, "sizes": [], "mean_curves": [], "inertia": 0.0}
    json.dump(raw, open(path, "w"))
    index = write_report(copy_run, contexts=False, progress=False)
    plots = os.path.join(os.path.dirname(index), "plots")
    assert sorted(os.listdir(plots)) == ["emergence.png", "rotation.png", "strength.png"]
    page = open(index, encoding="utf-8").read()
    for reason in ("add heldout to config.evals", "add separability to config.evals", "no clusters",
                   "no compare.json", "contexts=False", "the two phases were not measured"):
        assert reason in page
    keys = [c["key"] for c in read_data(os.path.dirname(index), "meta")["columns"]]
    assert "separability" not in keys and "frequency" not in keys


def test_the_two_phases_figure_from_the_summary(copy_run):
    from PIL import Image
    path = os.path.join(copy_run, "summary.json")
    raw = json.load(open(path))
    names = raw["snapshots"]
    raw["evals"]["phases"] = {"curves": {n: {"loss": 5.0 - i, "kl_unigram": 1.0 + (i - 1) ** 2, "kl_bigram": 3.0 - i,
                                             "pairs": 10} for i, n in enumerate(names)},
                              "transition": {"snapshot": names[-1], "step": None, "closest_to_unigram": names[1],
                                             "rule": "..."}, "stats_tokens": 100}
    json.dump(raw, open(path, "w"))
    index = write_report(copy_run, contexts=False, progress=False)
    with Image.open(os.path.join(os.path.dirname(index), "plots", "phases.png")) as im:
        assert im.format == "PNG"
    assert f"is smallest ({names[-1]})" in open(index, encoding="utf-8").read()


def test_a_missing_store_leaves_contexts_out_and_says_why(copy_run, tmp_path):
    path = os.path.join(copy_run, "summary.json")
    raw = json.load(open(path))
    raw["store"] = str(tmp_path / "moved-away")
    json.dump(raw, open(path, "w"))
    index = write_report(copy_run, progress=False)
    page = open(index, encoding="utf-8").read()
    assert "left out, no feature index" in page and "moved-away" in page
    meta = read_data(os.path.dirname(index), "meta")
    assert not meta["has_frequency"] and "moved-away" in meta["contexts_note"]


def test_the_saved_feature_index_is_reused_only_when_it_fits(copy_run, monkeypatch):
    from crossjax.analysis import lookup
    write_report(copy_run, progress=False)
    saved = os.path.join(copy_run, "index")                  # the run's one index, beside the report
    assert os.path.isfile(os.path.join(saved, "feature_index.npz"))
    assert not os.path.exists(os.path.join(copy_run, "report", "feature_index"))

    def no_build(*args, **kwargs):
        raise CrossjaxError("build called")
    monkeypatch.setattr(lookup.FeatureIndex, "build", classmethod(no_build))
    index = write_report(copy_run, progress=False)                          # same settings: loaded
    assert read_data(os.path.dirname(index), "meta")["has_frequency"]
    index = write_report(copy_run, contexts_per_snapshot=30, progress=False)   # more examples: rebuilt
    assert "build called" in open(index, encoding="utf-8").read()


def test_missing_summary_is_an_error_naming_the_fix(tmp_path):
    with pytest.raises(CrossjaxError, match="has not finished.*crossjax.train"):
        write_report(tmp_path)
    assert not os.path.exists(tmp_path / "report")


def test_damaged_export_is_an_error_and_the_previous_report_stays(copy_run):
    index = write_report(copy_run, contexts=False, progress=False)
    before = open(index, encoding="utf-8").read()
    weights = os.path.join(copy_run, "export", crosscoder_export.EXPORT_WEIGHTS)
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CrossjaxError, match="export it again"):
        write_report(copy_run, progress=False)
    assert open(index, encoding="utf-8").read() == before


def test_a_report_stopped_half_way_keeps_the_old_one_and_the_next_finishes(copy_run, monkeypatch):
    from crossjax.report import site
    index = write_report(copy_run, contexts=False, progress=False)
    before = open(index, encoding="utf-8").read()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(site, "write_site", killed)
        with pytest.raises(KeyboardInterrupt):
            write_report(copy_run, contexts=False, progress=False)
    assert open(index, encoding="utf-8").read() == before
    assert os.path.isdir(os.path.join(copy_run, "report.partial"))
    assert write_report(copy_run, contexts=False, progress=False) == index
    assert not os.path.exists(os.path.join(copy_run, "report.partial"))
    assert not os.path.exists(os.path.join(copy_run, "report.old"))


def test_bad_options_are_errors():
    for kwargs in ({"context_features": -1}, {"index_rows": 0}, {"contexts_per_snapshot": 2.5}):
        with pytest.raises(CrossjaxError, match="report option"):
            write_report("/nonexistent", **kwargs)


def test_command_writes_the_report_and_bad_input_exits_2(copy_run, tmp_path):
    def command(*args):
        return subprocess.run([sys.executable, "-m", "crossjax.report", *args], capture_output=True, text=True,
                              env=child_env(1), timeout=300)
    done = command(f"--workdir={copy_run}", "--nocontexts")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(f"report: {copy_run}/report/index.html (file://")
    for args, message in (((f"--workdir={tmp_path / 'none'}",), "has not finished"),
                          ((), "--workdir is required"), ((f"--workdir={copy_run}", "--bogus=1"), "bogus")):
        bad = command(*args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_contexts_are_decoded_with_the_runs_tokenizer(copy_run, tmp_path):
    import tokenizers
    from tokenizers.models import WordLevel
    tok = tokenizers.Tokenizer(WordLevel({f"w{i}": i for i in range(5000)}, unk_token="w0"))
    (tmp_path / "snap_planted_0").mkdir()
    tok.save(str(tmp_path / "snap_planted_0" / "tokenizer.json"))
    path = os.path.join(copy_run, "config.json")
    config = json.load(open(path))
    config["model"]["path_template"] = str(tmp_path / "snap_{snapshot}")
    json.dump(config, open(path, "w"))
    report = os.path.dirname(write_report(copy_run, progress=False))
    examples = [e for r in read_data(report, "feature", 0) if r["ctx"] for e in r["ctx"]["ex"]]
    assert examples and all(e[3] == f"w{e[0]}" for e in examples)      # planted stores: token id = row id
    assert "token ids" not in open(os.path.join(report, "index.html"), encoding="utf-8").read()


@pytest.fixture
def analysed_copy(analysed_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(analysed_run, dst)
    return str(dst)


def test_attribution_and_complexity_sections_show_the_analyses_outputs(analysed_copy):
    from crossjax.summary import RunSummary
    index = write_report(analysed_copy, progress=False)
    report = os.path.dirname(index)
    page = open(index, encoding="utf-8").read()
    attributed = json.load(open(os.path.join(analysed_copy, "attribution", "agreement.json")))
    scores = np.load(os.path.join(analysed_copy, "attribution", "agreement.npz"))
    scored = json.load(open(os.path.join(analysed_copy, "complexity_offline.json")))
    for name in ("attribution_agreement_metric", "attribution_agreement_curves", "complexity_offline"):
        assert_png(os.path.join(report, "plots", f"{name}.png"))
        assert f'id="plot-{name}"' in page
    assert 'id="attribution-attr_agreement"' in page and 'id="complexity-offline"' in page
    # the top attributed features of every snapshot link to their pages, in the writer's order
    for name, s in attributed["snapshots"].items():
        row = re.search(rf'<tr><td class="str">{name}</td>.*?</tr>', page).group(0)
        assert re.findall(r'feature\.html\?id=(\d+)', row) == [str(f) for f, _ in s["top"]["attribution"][:5]]
        assert f"<td>{s['metric_clean']:+.3f}</td>" in row
    last = s
    c = scored["correlation"]          # planted features all emerge at one snapshot: no correlation, and why
    assert c["spearman_r"] is None and f"No correlation: {c['note']}" in page
    assert "task attribution: not run" not in page and "not scored" not in page
    assert "<i>corrupted</i> is the metric with the corrupted prompts" in page     # not a sublayer hook
    # the table's columns: the largest attribution over snapshots, and the complexity of the scored features
    np.testing.assert_allclose(column(report, "attr_agreement"), scores["attribution"].max(axis=0), rtol=1e-3)
    cx = column(report, "cx_offline")
    want = {s["feature"]: s["complexity"] for s in scored["scores"]}
    assert cx == [want.get(f) for f in range(len(cx))] and sum(v is not None for v in cx) == len(want) > 0
    # each feature's page data: its attribution per snapshot and method, its score and explanation
    meta = read_data(report, "meta")
    assert meta["attribution"] == [{"task": "agreement", "key": "attr_agreement", "methods": list(scores.keys())[1::2],
                                    "snapshots": list(scores["snapshots"])}]
    records = read_data(report, "feature", 0)
    for f in (0, 7, len(records) - 1):
        np.testing.assert_allclose(records[f]["at"][0], [scores[m][:, f] for m in meta["attribution"][0]["methods"]],
                                   rtol=1e-3, atol=1e-6)
    s = scored["scores"][0]
    assert records[s["feature"]]["cx"] == [[s["complexity"], s["explanation"]]]
    assert "Attribution per snapshot" in open(os.path.join(report, "feature.html"), encoding="utf-8").read()
    # and a line of each in the run summary
    evals = RunSummary.read(analysed_copy).evals
    assert evals["attribution"]["agreement"]["top_features"] == [f for f, _ in last["top"]["attribution"][:5]]
    assert evals["complexity"]["offline"]["spearman_r"] is None
    assert evals["complexity"]["offline"]["features"] == c["features"] == len(want)
    headline = train.report(RunSummary.read(analysed_copy)).splitlines()
    assert f"complexity (offline): no correlation ({c['note']})" in headline


def test_the_attribution_section_says_what_corrupted_means_at_a_sublayer_hook(analysed_copy):
    """At an attention output the clean run gets the corrupted activation patched in: the section says so."""
    path = os.path.join(analysed_copy, "attribution", "agreement.json")
    attributed = json.load(open(path))
    attributed["hook"] = "blocks.0.hook_attn_out"
    json.dump(attributed, open(path, "w"))
    page = open(write_report(analysed_copy, progress=False), encoding="utf-8").read()
    assert "<i>corrupted</i> is the metric with the corrupted activation patched in at the hook" in page
    assert "with the corrupted prompts" not in page


def test_the_complexity_section_gives_spearman_with_p_and_n(analysed_copy):
    path = os.path.join(analysed_copy, "complexity_offline.json")
    scored = json.load(open(path))
    scored["correlation"] = {"features": 20, "spearman_r": 0.2342, "spearman_p": 0.00084, "pearson_r": 0.2038,
                             "pearson_p": 0.0038, "never_emerged": 0, "failed": 0, "steps": "step", "note": None}
    json.dump(scored, open(path, "w"))
    page = open(write_report(analysed_copy, contexts=False, progress=False), encoding="utf-8").read()
    section = re.search(r'<section class="analysis" id="complexity-offline">.*?</section>', page, re.S).group(0)
    assert "Scorer offline" in section and "Spearman r +0.234 (p 0.00084)" in section and "n = 20 features" in section
    assert "Pearson r +0.204 (p 0.0038)" in section and 'src="plots/complexity_offline.png"' in section


def test_analyses_of_other_weights_or_runs_are_left_out_with_the_command(analysed_copy):
    path = os.path.join(analysed_copy, "attribution", "agreement.json")
    result = json.load(open(path))
    result["export_sha256"] = "0" * 64                       # computed from weights the run no longer has
    json.dump(result, open(path, "w"))
    scored = os.path.join(analysed_copy, "complexity_offline.json")
    result = json.load(open(scored))
    result["scores"][0]["feature"] = 10 ** 6                  # a feature this run does not have
    json.dump(result, open(scored, "w"))
    page = open(write_report(analysed_copy, contexts=False, progress=False), encoding="utf-8").read()
    assert "agreement.json was computed from other weights than the run&#x27;s export" in page
    assert f"python -m crossjax.analyze --workdir={analysed_copy} --task=agreement" in page
    assert "scores features beyond this run" in page and "--complexity=offline" in page
    assert 'id="attribution"' not in page and 'id="complexity"' not in page
    os.truncate(path[:-len(".json")] + ".npz", 100)        # a torn .npz: unreadable, named with the fix
    page = open(write_report(analysed_copy, contexts=False, progress=False), encoding="utf-8").read()
    assert "or its .npz is unreadable" in page


def test_the_report_and_complexity_scoring_share_one_index_pass(copy_run, monkeypatch):
    from crossjax.analysis import lookup
    from crossjax.complexity.run import score_run
    real, builds, rows = lookup.FeatureIndex.build.__func__, [], []

    def counted(cls, *args, **kwargs):
        builds.append(kwargs.get("top_k"))
        rows.append(kwargs.get("max_rows"))
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(lookup.FeatureIndex, "build", classmethod(counted))
    score_run(copy_run, features=5, progress=False)            # builds workdir/index
    saved = os.path.join(copy_run, "index", "feature_index.npz")
    mtime = os.path.getmtime(saved)
    write_report(copy_run, progress=False)                      # the second consumer reuses it
    score_run(copy_run, features=5, progress=False)
    assert builds == [10] and os.path.getmtime(saved) == mtime
    write_report(copy_run, contexts_per_snapshot=12, progress=False)   # more examples than kept: one new pass
    score_run(copy_run, features=5, progress=False)                    # which serves the next consumer too
    assert builds == [10, 12] and os.path.getmtime(saved) > mtime
    # a rebuild for more rows keeps the old index's examples: its consumer does not rebuild it back
    shutil.rmtree(os.path.join(copy_run, "index"))
    del builds[:], rows[:]
    write_report(copy_run, contexts_per_snapshot=12, index_rows=1000, progress=False)
    score_run(copy_run, features=5, progress=False)             # asks for every row (4096), 10 examples
    write_report(copy_run, contexts_per_snapshot=12, index_rows=1000, progress=False)
    assert builds == [12, 12] and rows == [1000, 131072]
