"""Report and monitoring: the self-contained HTML report with plots, PNG export, the live monitor (a streamer), and
the CLI's --report, --png-dir and --monitor on a tiny model."""

from __future__ import annotations

import base64
import copy
import io
import json
import re

import pytest
import torch
from tiny import ids, tiny_llama

import dscompile
from dscompile import cli
from dscompile.live import LiveMonitor
from dscompile.report_html import render_html, save_plots, short_names, write_html_report

PNG = b"\x89PNG\r\n\x1a\n"
ALL = {"mla": {"kv_ratio": 0.5}, "moe": {"n_experts": 16, "n_shared": 2, "top_k": 6}, "mtp": {"depth": 2}}
HEADINGS = ("Summary", "Before / after", "Generation", "MLA: KV rank per layer", "MoE: expert load",
            "MTP: acceptance by draft position", "Graph diff", "Passes")


@pytest.fixture(scope="module")
def full():
    """A tiny Llama with MLA, MoE and MTP, after one generate call (so the report has MTP acceptance)."""
    torch._dynamo.reset()
    calibration = torch.randint(0, 128, (4, 300), generator=torch.Generator().manual_seed(0))
    opt = dscompile.optimize(tiny_llama(), ALL, calibration=calibration, lower="eager")
    opt.generate(ids(1, 8), max_new_tokens=12, eos_token_id=[])
    return opt


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_html_report_is_self_contained_with_every_plot(full, tmp_path):
    report = full.report()
    rows = [("perplexity (held-out)", 10.0, 10.5, "{:.3f}"), ("KV bytes per token", 512, 256, "{:,}")]
    path = write_html_report(report, tmp_path / "sub" / "out.html", table=rows,
                             generation=full.monitor.last.to_dict(), png_dir=tmp_path / "png")
    text = path.read_text(encoding="utf-8")
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in text
    for layer, rank in report.to_dict()["mla_ranks"].items():  # every layer's rank, in the table
        assert f"<td>{layer}</td><td class=\"num\">{rank:,}</td>" in text
    assert "10.500" in text and "+5.00%" in text and "-50.00%" in text  # the before/after rows
    assert "decode tokens/s" in text and "MTP tokens per step" in text
    assert "model.layers.0.mlp" in text and "MaxVio" in text
    assert "rewritten: model.layers.0.self_attn" in text and "-&gt;" in text  # the graph diff, escaped
    images = _images(text)
    assert len(images) == 3 and all(png.startswith(PNG) for png in images)
    assert not re.search(r"https?://", text) and "<script" not in text and "<link" not in text
    files = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert files == ["expert_load.png", "kv_rank.png", "mtp_acceptance.png"]
    assert all((tmp_path / "png" / f).read_bytes().startswith(PNG) for f in files)


def test_report_dict_from_json_renders_the_same_diff_and_plots(full, tmp_path):
    report = full.report()
    data = json.loads(json.dumps(report.to_dict()))
    text = render_html(data)
    assert str(report.diff).replace(">", "&gt;") in text
    assert len(_images(text)) == 3
    paths = save_plots(data, tmp_path / "plots")
    assert [p.name for p in paths] == ["kv_rank.png", "expert_load.png", "mtp_acceptance.png"]
    assert all(p.read_bytes().startswith(PNG) for p in paths)


def test_mtp_acceptance_falls_back_to_generation_stats_or_says_it_is_missing(full):
    data = full.report().to_dict()
    accepted = data.pop("mtp_acceptance")
    data.pop("mtp_tokens_per_step")
    assert "no generate call with speculation was made yet" in render_html(data)
    generation = {"extra": {"mtp_acceptance": accepted, "mtp_tokens_per_step": 2.5}}
    text = render_html(data, generation=generation)
    assert "2.50 tokens per step" in text and len(_images(text)) == 3


def test_text_is_escaped(full):
    data = copy.deepcopy(full.report().to_dict())
    data["profile"]["name"] = "<script>alert('x')</script>"
    data["mla_ranks"] = {"<b>layer & co</b>": 7}
    data["mla_skipped"] = {"layer\"9": "reason <i>"}
    text = render_html(data, table=[("<tr>", 1, 2)], title="a < b")
    assert "<script>" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "&lt;b&gt;layer &amp; co&lt;/b&gt;" in text and "reason &lt;i&gt;" in text
    assert "<h1>a &lt; b</h1>" in text and "<td>&lt;tr&gt;</td>" in text


def test_a_profile_without_rewrites_says_so_instead_of_plotting(tmp_path):
    opt = dscompile.optimize(tiny_llama(), "none", example_inputs=ids(), lower="eager")
    path = write_html_report(opt.report(), tmp_path / "none.html", png_dir=tmp_path / "png")
    text = path.read_text(encoding="utf-8")
    assert "No MLA in this profile" in text and "No MoE in this profile" in text and "No MTP in this profile" in text
    assert "No generation was run" in text and "graph diff (no changes)" in text
    assert "<img" not in text and "KV bytes per token" in text  # the default before/after rows
    assert save_plots(opt.report(), tmp_path / "png") == []


def test_short_names_drop_the_shared_dotted_parts():
    assert short_names(["model.layers.0.mlp", "model.layers.10.mlp"]) == ["0", "10"]
    assert short_names(["a.x", "b.x", "c"]) == ["a.x", "b.x", "c"]
    assert short_names(["only.one"]) == ["only.one"]


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_live_monitor_is_rate_limited_and_shows_rate_and_cache_bytes():
    clock, out = FakeClock(), io.StringIO()
    mon = LiveMonitor(out, cache_bytes_per_token=1024, prompt_tokens=4, interval=0.1, clock=clock,
                      expert_load={"l0": [0.5, 1.5], "l1": [1.0, 1.0]})
    for _ in range(100):  # 100 tokens of 2 rows in 0.5 s: 200 tokens/s ...
        mon.put(torch.tensor([1, 2]))
        clock.t += 0.005
    assert 5 <= mon.updates <= 7  # ... but at most one line per 0.1 s
    assert mon.tokens == 200
    line = mon.lines[-1]
    assert "tok/s" in line and "KV cache" in line and "expert load max/mean 1.50 (calibrated)" in line
    mon.put_stats({"mtp_acceptance": [0.75, 0.5], "mtp_tokens_per_step": 2.25})
    mon.end()
    final = mon.lines[-1]
    assert final.startswith("generating: 200 tokens") and "KV cache 208.0 KiB in use" in final  # 1 KiB x 2 rows x 104
    assert f"{2 * 99 / 0.5:.1f} tok/s" in final and "MTP 2.25 tokens/step (kept 0.75/0.50)" in final
    assert out.getvalue().startswith("\r") and out.getvalue().endswith("\n") and "\n" not in out.getvalue()[:-1]
    mon.end()  # nothing after a finished call, and a new call starts from zero
    assert out.getvalue().count("\n") == 1 and mon.steps == 0


def test_live_monitor_as_the_streamer_of_a_speculative_generate(full):
    out = io.StringIO()
    mon = LiveMonitor.for_model(full, out, prompt_tokens=8, interval=0.0)
    got = full.generate(ids(1, 8), max_new_tokens=10, eos_token_id=[], streamer=mon)
    assert mon.steps == 0 and out.getvalue().endswith("\n")  # end() was called
    final = mon.lines[-1]
    assert final.startswith(f"generating: {got.shape[1] - 8} tokens") and "tok/s" in final
    per_token = full.runtime().program.cache_bytes_per_token()
    assert f"KV cache {per_token * 18 / 1024:.1f} KiB" in final
    peak = max(max(v) for v in full.monitor.last.extra["moe_expert_load"].values())
    assert "tokens/step (kept" in final and f"expert load max/mean {peak:.2f} (live)" in final


class CharTokenizer:
    """One token per character: enough text handling for the CLI's perplexity, calibration and generation."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 128 for c in text]}

    def decode(self, tokens) -> str:
        return "".join(chr(int(t)) for t in tokens)


def test_cli_writes_the_report_and_plots_and_shows_the_live_monitor(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda name: (tiny_llama(), CharTokenizer()))
    profile = tmp_path / "all.json"
    profile.write_text(json.dumps(ALL), encoding="utf-8")
    report, png = tmp_path / "report.html", tmp_path / "png"
    code = cli.main(["optimize", "--model", "tiny", "--profile", str(profile), "--lower", "eager", "--windows", "1",
                     "--window", "32", "--calibration-tokens", "600", "--generate", "6", "--report", str(report),
                     "--png-dir", str(png), "--monitor"])
    assert code == 0
    captured = capsys.readouterr()
    assert f"wrote {report}" in captured.out and "generation: batch 1" in captured.out
    assert "\rgenerating: " in captured.err and "tok/s" in captured.err and "(live)" in captured.err
    text = report.read_text(encoding="utf-8")
    assert "tiny, profile all, lowered with eager" in text and "perplexity (held-out)" in text
    assert "forward tokens/s (32 tokens)" in text and len(_images(text)) == 3
    assert sorted(p.name for p in png.iterdir()) == ["expert_load.png", "kv_rank.png", "mtp_acceptance.png"]


def test_cli_png_dir_alone_and_no_flags_keep_the_old_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda name: (tiny_llama(), CharTokenizer()))
    args = ["optimize", "--model", "tiny", "--lower", "eager", "--windows", "1", "--window", "16", "--generate", "2"]
    assert cli.main([*args, "--png-dir", str(tmp_path / "png")]) == 0
    assert "wrote 0 plot(s)" in capsys.readouterr().out  # profile none has nothing to plot
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "wrote" not in captured.out and "generating:" not in captured.err
