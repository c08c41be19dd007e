"""`betadiff report --document`: a reproduction document from several sweeps of a real MLflow store: numbers equal
an independent aggregation over MLflow's own API, slices merge into one table, reference numbers sit beside ours,
claims are checked, every cell names its run ids, and regenerating from the same store gives the same bytes."""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from betadiff.report.cli import main

HERE = Path(__file__).resolve().parent


def _store_module():
    spec = importlib.util.spec_from_file_location("test_report_store", HERE / "test_report_store.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The shared ablation store plus a slice sweep `toyabl_more` adding seed 2 of (klub, eta=10)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("docstore")
    info = _store_module().build_store(root)
    client = MlflowClient(tracking_uri=info["uri"])
    t0 = 1_700_100_000_000
    parent = client.create_run(
        info["experiment_id"], start_time=t0, run_name="toyabl_more",
        tags={"betadiff.role": "sweep", "betadiff.sweep": "toyabl_more", "betadiff.status": "FINISHED"},
    ).info.run_id
    rid = client.create_run(
        info["experiment_id"], start_time=t0 + 1000, run_name="toyabl_more-000",
        tags={"mlflow.parentRunId": parent, "betadiff.role": "trial", "betadiff.sweep": "toyabl_more",
              "betadiff.factor.diffusion.loss": "klub", "betadiff.factor.diffusion.eta": "10",
              "betadiff.seed": "2", "betadiff.budget": "30"},
    ).info.run_id
    client.log_batch(rid, metrics=[Metric("w1", v, t0 + 2000 + s, s) for s, v in ((10, 0.05), (20, 0.03), (30, 0.017))]
                     + [Metric("jsd", v, t0 + 2000 + s, s) for s, v in ((10, 0.02), (20, 0.01), (30, 0.006))])
    client.set_terminated(rid, "FINISHED", end_time=t0 + 61_000)
    client.set_terminated(parent, "FINISHED", end_time=t0 + 65_000)
    info["extra_run"] = rid
    # a sweep of methods (a variant factor) whose klub run shares the design's settings but eta=5: the baseline
    parent = client.create_run(
        info["experiment_id"], start_time=t0 + 100_000, run_name="toyabl_base",
        tags={"betadiff.role": "sweep", "betadiff.sweep": "toyabl_base", "betadiff.status": "FINISHED"},
    ).info.run_id
    for i, (method, w1) in enumerate((("klub", 0.011), ("elbo", 0.033))):
        rid = client.create_run(
            info["experiment_id"], start_time=t0 + 101_000 + i, run_name=f"toyabl_base-{i:03d}",
            tags={"mlflow.parentRunId": parent, "betadiff.role": "trial", "betadiff.sweep": "toyabl_base",
                  "betadiff.factor.method": method, "betadiff.seed": "0", "betadiff.budget": "30"},
        ).info.run_id
        client.log_batch(rid, metrics=[Metric("w1", w1, t0 + 102_000, 30), Metric("jsd", w1 / 3, t0 + 102_000, 30)],
                         params=[Param("diffusion.loss", method), Param("diffusion.eta", "5"),
                                 Param("train.steps", "30")])
        client.set_terminated(rid, "FINISHED", end_time=t0 + 103_000)
        info[f"base_{method}"] = rid
    client.set_terminated(parent, "FINISHED", end_time=t0 + 104_000)
    return info


def _spec(tmp_path: Path, store: dict, **over) -> Path:
    text = textwrap.dedent(f"""\
        title: Test reproduction
        intro: Our numbers beside theirs.
        machine: 2 cores, test machine
        regenerate: betadiff report --document spec.yaml -o doc.md
        tracking_uri: "{store['uri']}"
        experiment: ablate
        sections:
          - title: Loss ablation
            sweeps: [toyabl, toyabl_more]
            commands: ["betadiff sweep run toyabl.yaml"]
            rows: [diffusion.loss]
            cols: [diffusion.eta]
            metrics: [w1, jsd]
            last_k: 2
            last_k_metrics: [w1]
            reference:
              - {{where: {{diffusion.loss: klub, diffusion.eta: 1}}, w1: 0.021, jsd: 0.007}}
            claims:
              - {{text: klub below 0.05, where: {{diffusion.loss: klub, diffusion.eta: 1}}, metric: w1, op: "<=", value: 0.05}}
              - {{text: elbo beats klub, where: {{diffusion.loss: elbo, diffusion.eta: 1}}, metric: w1, op: "<",
                  than: {{diffusion.loss: klub, diffusion.eta: 1}}}}
              - {{text: missing cell, where: {{diffusion.loss: elbo, diffusion.eta: 10}}, metric: w1, value: 1.0}}
            figures: [w1]
            notes: Honest notes here.
        """)
    for k, v in over.items():
        text = text.replace(k, v)
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def _independent(uri: str, run_ids: list[str], metric: str, last_k: int = 1) -> float:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    vals = []
    for rid in run_ids:
        h = sorted(c.get_metric_history(rid, metric), key=lambda m: (m.step, m.timestamp))
        by_step = {m.step: m.value for m in h}
        steps = sorted(by_step)[-last_k:]
        vals.append(np.mean([by_step[s] for s in steps]))
    return float(np.mean(vals))


def test_document_numbers_claims_runs_and_bytes(store, tmp_path, capsys):
    spec = _spec(tmp_path, store)
    out = tmp_path / "doc.md"
    assert main(["report", "--document", str(spec), "-o", str(out), "-q"]) == 0
    text = out.read_text()
    assert text.startswith("# Test reproduction") and "Honest notes here." in text and "2 cores" in text
    # the (klub, 10) cell merges toyabl's seeds 0, 1 with toyabl_more's seed 2
    finished = {(t["loss"], t["eta"]): [] for t in store["trials"]}
    for t in store["trials"]:
        if t["status"] == "FINISHED" and t["budget"] == 30:
            finished[(t["loss"], t["eta"])].append(t["run_id"])
    finished[("klub", "10")].append(store["extra_run"])
    row = next(ln for ln in text.splitlines() if ln.startswith("| klub | 10 |"))
    cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
    assert cells[2] == "3"
    w1 = _independent(store["uri"], finished[("klub", "10")], "w1")
    assert abs(float(cells[3].split(" ± ")[0]) - w1) < 1e-3
    lastk = _independent(store["uri"], finished[("klub", "10")], "w1", last_k=2)
    assert abs(float(cells[5]) - lastk) < 1e-3
    for rid in finished[("klub", "10")]:  # short ids in the table, full ids below it
        assert rid[:8] in row and f"`{rid}`" in text
    ref_row = next(ln for ln in text.splitlines() if ln.startswith("| klub | 1 |"))
    assert "0.021" in ref_row and "0.007" in ref_row
    assert re.search(r"✓ holds: klub below 0\.05", text)
    assert re.search(r"✗ fails: elbo beats klub", text)
    assert "? missing cell: not measured" in text
    png = tmp_path / "doc" / "loss_ablation_w1.png"
    assert png.is_file() and "](doc/loss_ablation_w1.png)" in text
    assert "toyabl_more" in text and store["parent"] in text
    # regenerating from the same store gives the same document and figure
    first, fig = text, png.read_bytes()
    assert main(["report", "--document", str(spec), "-o", str(out), "-q"]) == 0
    assert out.read_text() == first and png.read_bytes() == fig


@pytest.mark.parametrize(
    "edit, needle",
    [
        (("notes: Honest", "nots: Honest"), "nots"),
        (('op: "<="', 'op: "=="'), "claims[0].op"),
        (("sweeps: [toyabl, toyabl_more]", "sweeps: [nosuch]"), "nosuch"),
        (("sweeps: [toyabl, toyabl_more]", "sweeps: []"), "sweeps"),
    ],
)
def test_bad_document_spec_one_line(store, tmp_path, capsys, edit, needle):
    spec = _spec(tmp_path, store, **{edit[0]: edit[1]})
    assert main(["report", "--document", str(spec), "-o", str(tmp_path / "d.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and not (tmp_path / "d.md").exists()


def test_only_takes_a_shared_baseline_run_from_another_sweep(store, tmp_path):
    """`only: {sweep: {key: levels}}` picks runs by factor or config key; a factor the other sweep does not vary
    takes its runs' config value, so its klub run lands in the (klub, 5) cell and its elbo run nowhere."""
    spec = _spec(tmp_path, store, **{
        "sweeps: [toyabl, toyabl_more]": "sweeps: [toyabl, toyabl_base]\n"
        "    only: {toyabl: {diffusion.eta: [1]}, toyabl_base: {method: klub}}",
        "    last_k: 2\n    last_k_metrics: [w1]\n": "",
    })
    out = tmp_path / "doc.md"
    assert main(["report", "--document", str(spec), "-o", str(out), "-q"]) == 0
    text = out.read_text()
    rows = {tuple(c.strip().strip("*") for c in ln.strip("|").split("|")[:2]): ln
            for ln in text.splitlines() if ln.startswith(("| klub |", "| elbo |"))}
    assert set(rows) == {("klub", "1"), ("elbo", "1"), ("klub", "5"), ("elbo", "5")}
    assert store["base_klub"][:8] in rows[("klub", "5")] and "0.0110" in rows[("klub", "5")]
    assert store["base_elbo"][:8] not in text and "| — |" in rows[("elbo", "5")]
    assert not any(r.startswith(("| klub | 10 |", "| elbo | 10 |")) for r in text.splitlines())


@pytest.mark.parametrize(
    "only, needle",
    [
        ("{nosuch: {method: klub}}", "sections[0].only.nosuch: not one of the section's sweeps"),
        ("{toyabl_base: {nokey: 1}}", "sections[0].only.toyabl_base.nokey: no run of sweep 'toyabl_base'"),
    ],
)
def test_bad_only_one_line(store, tmp_path, capsys, only, needle):
    spec = _spec(tmp_path, store, **{"sweeps: [toyabl, toyabl_more]": f"sweeps: [toyabl, toyabl_base]\n    only: {only}"})
    assert main(["report", "--document", str(spec), "-o", str(tmp_path / "d.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and not (tmp_path / "d.md").exists(), err


def test_best_cell_claim_and_sample_grids(store, tmp_path):
    """`best: true` claims pick the section's best cell on the metric (the `than` cell excluded); `samples: true`
    copies each cell's sample grid from its first run, and a clone without the artifact store keeps the copies."""
    import shutil
    from urllib.parse import urlparse

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store["uri"])
    spec = _spec(tmp_path, store, **{
        "    figures: [w1]\n": "    samples: true\n",
        "- {text: missing cell, where: {diffusion.loss: elbo, diffusion.eta: 10}, metric: w1, value: 1.0}":
            "- {text: the best cell beats klub at 1, best: true, metric: w1, op: '<',"
            " than: {diffusion.loss: klub, diffusion.eta: 1}}",
    })
    out = tmp_path / "doc.md"
    assert main(["report", "--document", str(spec), "-o", str(out), "-q"]) == 0
    text = out.read_text()
    table, first_run = {}, {}
    for ln in text.splitlines():
        if ln.startswith("| elbo |") or ln.startswith("| klub |"):
            c = [x.strip().strip("*") for x in ln.strip("|").split("|")]
            if c[3] != "—":
                table[(c[0], c[1])] = float(c[3].split(" ± ")[0])
                first_run[(c[0], c[1])] = c[-1].split(",")[0].strip()
    others = {k: v for k, v in table.items() if k != ("klub", "1")}
    best = min(others, key=others.get)
    line = next(ln for ln in text.splitlines() if "the best cell beats klub at 1" in ln)
    assert f"diffusion.loss={best[0]}, diffusion.eta={best[1]}" in line
    assert ("✓ holds" in line) == (others[best] < table[("klub", "1")])
    exp = client.get_experiment(store["experiment_id"])
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=1000)}
    copies = {}
    for (loss, eta), short in first_run.items():  # each grid is its cell's first run's artifact, byte for byte
        rid = next(r for r in runs if r.startswith(short))
        copied = tmp_path / "doc" / f"loss_ablation_samples_{loss}_{eta}.png"
        if "samples.png" not in [a.path for a in client.list_artifacts(rid)]:
            assert not copied.exists() and copied.name not in text
            continue
        ref = Path(client.download_artifacts(rid, "samples.png", str(tmp_path / "ref" / rid)))
        assert copied.read_bytes() == ref.read_bytes() and f"](doc/{copied.name})" in text
        copies[copied] = copied.read_bytes()
    assert len(copies) == len(list((tmp_path / "doc").glob("*_samples_*.png"))) >= 2
    shutil.rmtree(urlparse(exp.artifact_location).path)  # a clone holding the tracking database only
    assert main(["report", "--document", str(spec), "-o", str(out), "-q"]) == 0
    assert out.read_text() == text and all(p.read_bytes() == b for p, b in copies.items())
