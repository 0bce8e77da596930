"""Runs every benchmark and rewrites the generated tables in BENCHMARKS.md (``make bench``).

Usage::

    python bench/run_all.py                 # everything: ~100 min (quality alone is ~65)
    python bench/run_all.py --quick         # a smoke run of everything: ~15 min
    python bench/run_all.py --skip quality  # all but the 2 x 30-minute quality runs
    python bench/run_all.py --report-only   # re-render BENCHMARKS.md from bench/results/

Benchmarks run one after another, each in its own processes: train_speed.py, quality.py,
memory.py, sample_speed.py and serving_speed.py.
Only the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in BENCHMARKS.md
is replaced; the prose around it is kept. Figures from ``--quick`` runs are labelled as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys

import common

BENCHMARKS_MD = common.REPO / "BENCHMARKS.md"
NAMES = ["train_speed", "quality", "memory", "sample_speed", "serving_speed"]


def _run_script(script: str, args: list[str], timeout: float) -> str:
    """Runs ``bench/<script>``, streaming nothing; returns its stdout (or the failure)."""
    cmd = [sys.executable, str(common.BENCH / script), *args]
    print("$", " ".join(cmd[1:]), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=common.REPO)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    out = proc.stdout
    if proc.returncode != 0:
        out += f"\nexit {proc.returncode}:\n" + "\n".join(proc.stderr.splitlines()[-8:])
    print(out, flush=True)
    return out


def _load(name: str):
    path = common.RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(x, digits=0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _header(result: dict, command: str) -> list[str]:
    m = result["machine"]
    quick = " **Quick smoke run: too short to quote.**" if result.get("quick") else ""
    flags = ", ".join(m.get("bf16", [])) or "none"
    return [
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, bf16 flags: {flags}; "
        f"1-minute load average at the start: {m['loadavg_1min']:.2f}. "
        f"Command: `{command}`.{quick}",
        "",
    ]


def render_train_speed(result: dict) -> str:
    cmd = "python bench/train_speed.py" + (" --quick" if result.get("quick") else "")
    lines = _header(result, cmd)
    rates = result["matmul_gflops"]
    f32 = rates.get("float32", {}).get("median")
    bf16 = rates.get("bfloat16", {}).get("median")
    lines += [
        f"Matmul rate (TensorFlow, 2048x2048, median): float32 {_fmt(f32)} GFLOP/s, "
        f"bfloat16 {_fmt(bf16)} GFLOP/s.",
        "",
    ]
    for config, entry in result["configs"].items():
        s = entry["shape"]
        torch_med = entry["impls"].get("torch", {}).get("chars_per_s", {}).get("median")
        lines += [
            f"**Seed {config}**: {s['num_layers']} x {s['rnn_size']}, embedding "
            f"{s['embedding_dim']}, batch {s['batch_size']}, seq {s['seq_length']}; "
            f"{entry['train_flops_per_char'] / 1e6:.1f} MFLOP per character per training step.",
            "",
            "| implementation | threads | chars/s min | median | max | vs torch | GFLOP/s "
            "| of f32 matmul | of bf16 matmul |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for impl, r in entry["impls"].items():
            if "error" in r:
                lines.append(f"| {impl} | {r.get('threads', '')} | failed: {r['error'][:80]} |")
                continue
            c = r["chars_per_s"]
            ratio = c["median"] / torch_med if torch_med else None
            gflops = c["median"] * entry["train_flops_per_char"] / 1e9
            lines.append(
                f"| {impl} | {r['threads']} | {_fmt(c['min'])} | {_fmt(c['median'])} | "
                f"{_fmt(c['max'])} | {_fmt(ratio, 2)} | {_fmt(gflops)} | "
                f"{_fmt(r.get('fraction_of_float32_matmul'), 2)} | "
                f"{_fmt(r.get('fraction_of_bfloat16_matmul'), 2)} |"
            )
        lines.append("")
    lines.append(
        "threads: ours `intra,inter,chains,time_chunks`, PyTorch `threads,interop`; each "
        "implementation uses the fastest of its candidates in a one-window trial (none in "
        "--quick)."
    )
    return "\n".join(lines)


def _loss_cell(run: dict, mark) -> str:
    nats, bits = run.get(f"val_loss_{mark}min"), run.get(f"val_bpc_{mark}min")
    return "not reached" if nats is None else f"{nats:.3f} / {bits:.3f}"


def render_quality(result: dict) -> str:
    minutes = result["minutes"]
    cmd = f"python bench/quality.py --minutes {minutes:g}"
    lines = _header(result, cmd)
    cfg = result["config"]
    lines += [
        f"Config `{result['config_name']}`: {cfg['model']['num_layers']} x "
        f"{cfg['model']['rnn_size']}, embedding {cfg['model']['embedding_dim']}, dropout "
        f"{cfg['model']['dropout']}, batch {cfg['data']['batch_size']}, seq "
        f"{cfg['data']['seq_length']}, Adam {cfg['train']['learning_rate']} x "
        f"{cfg['train']['lr_decay']}/epoch, clip {cfg['train']['grad_clip']}. Validation: "
        "last 10% of tinyshakespeare, from a zero state; training time excludes validation.",
        "",
        f"| run | val loss @10 min (nats / bits) | @30 min | @end ({minutes:g} min) | best "
        "| chars/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for impl, r in result["runs"].items():
        if "error" in r:
            lines.append(f"| {impl} | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {impl} | {_loss_cell(r, 10)} | {_loss_cell(r, 30)} | "
            f"{_loss_cell(r, f'{minutes:g}')} | {_fmt(r.get('best_val_loss'), 3)} | "
            f"{_fmt(r.get('chars_per_s'))} |"
        )
    stem = "quality" if minutes >= 30 else f"quality_{minutes:g}min"
    lines += ["", f"![validation loss against training time](bench/results/{stem}.png)"]
    return "\n".join(lines)


def render_memory(result: dict) -> str:
    cmd = "python bench/memory.py" + (" --quick" if result["corpus_mb"] != 100 else "")
    lines = _header(result, cmd)
    lines += ["| corpus, model | corpus bytes | peak RSS (MB) |", "|---|---:|---:|"]
    for r in result["runs"]:
        rss = r.get("peak_rss_mb")
        lines.append(
            f"| {r['label']} | {r['corpus_bytes']:,} | "
            f"{_fmt(rss) if rss else 'failed: ' + r.get('error', '')[:80]} |"
        )
    if "bytes_per_corpus_byte" in result:
        lines += [
            "",
            f"Memory per byte of corpus: {result['bytes_per_corpus_byte']:.2f} bytes "
            f"(2 x 128: large corpus minus 1 MB corpus). 2 x 512 adds "
            f"{result['model_mb_2x512_minus_2x128']:,.0f} MB over 2 x 128 on the same corpus.",
        ]
    return "\n".join(lines)


# The targets for the exported generate signature, in chars/s.
GENERATION_TARGETS = {
    f"generate, {where}, batch {batch}": target
    for where in ("in-process", "gRPC")
    for batch, target in ((1, 3000), (8, 15000))
}


def _spread(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{ordered[0]:,.0f} | {statistics.median(ordered):,.0f} | {ordered[-1]:,.0f}"


def render_generation(sample: dict | None, serving: dict | None) -> str:
    """One table of characters per second: charrnn sample, then the exported signatures."""
    first = serving or sample
    quick = any(r and r.get("quick") for r in (sample, serving))
    cmd = "python bench/sample_speed.py; python bench/serving_speed.py" + (
        " (both --quick)" if quick else ""
    )
    lines = _header({**first, "quick": quick}, cmd)
    lines += [
        "| what | model | batch | chars/s min | median | max | target |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    if sample:
        for model, values in sample["chars_per_s"].items():
            lines.append(f"| `charrnn sample` (Sampler) | {model} | 1 | {_spread(values)} | |")
    if serving:
        model = serving["model"].replace(" LSTM", "")
        for label, values in serving["chars_per_s"].items():
            what, batch = label.rsplit(", batch ", 1)
            target = GENERATION_TARGETS.get(label)
            lines.append(
                f"| {what} | {model} | {batch} | {_spread(values)} | "
                f"{_fmt(target) if target else ''} |"
            )
        n = serving["repeats"]
        lines += [
            "",
            f"Windows: {n} per row after a warm-up call ({sample['chars'] if sample else '?'} "
            f"characters per `charrnn sample` window, {serving['chars']} per `generate` row).",
        ]
    return "\n".join(lines)


def render_serving(serving: dict) -> str:
    lines = _header(
        serving, "python bench/serving_speed.py" + (" --quick" if serving.get("quick") else "")
    )
    lines += [
        f"{serving['model']}, 200-character `generate` requests over gRPC to `charrnn serve` "
        "on loopback, each client one request at a time.",
        "",
        "| clients | requests | p50 ms | p99 ms | requests/s | chars/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in serving["latency"]:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['p50_ms']:,.1f} | {r['p99_ms']:,.1f} | "
            f"{r['requests_per_s']:.1f} | {_fmt(r['chars_per_s'])} |"
        )
    return "\n".join(lines)


def replace_section(markdown: str, name: str, body: str) -> str:
    """Replaces the text between the section's markers (appends the section if missing)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(markdown):
        return pattern.sub(lambda _: block, markdown)
    return markdown.rstrip() + f"\n\n## {name}\n\n{block}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of everything")
    parser.add_argument("--skip", nargs="*", default=[], choices=NAMES, help="benchmarks to skip")
    parser.add_argument("--quality-minutes", type=float, help="default 30 (1 with --quick)")
    parser.add_argument("--report-only", action="store_true", help="only re-render the tables")
    args = parser.parse_args()
    quick = ["--quick"] if args.quick else []
    suffix = "_quick" if args.quick else ""
    if not args.report_only:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        print(f"benchmarks started {stamp}", flush=True)
        if "train_speed" not in args.skip:
            _run_script("train_speed.py", quick, 3 * 3600)
        if "quality" not in args.skip:
            minutes = args.quality_minutes or (1 if args.quick else 30)
            _run_script("quality.py", ["--minutes", f"{minutes:g}"], minutes * 150 + 1800)
        if "memory" not in args.skip:
            _run_script("memory.py", quick, 3600)
        for name in ("sample_speed", "serving_speed"):
            if name not in args.skip:
                out = str(common.RESULTS / f"{name}{suffix}.json")
                _run_script(f"{name}.py", [*quick, "--json", out], 1800)
    write_report(args.quick, args.quality_minutes)


def write_report(quick: bool, quality_minutes: float | None) -> None:
    """Rewrites BENCHMARKS.md's generated sections from the saved results."""
    suffix = "_quick" if quick else ""
    markdown = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    train = _load(f"train_speed{suffix}.json")
    if train:
        markdown = replace_section(markdown, "train_speed", render_train_speed(train))
    minutes = quality_minutes or (1 if quick else 30)
    quality = _load("quality.json" if minutes >= 30 else f"quality_{minutes:g}min.json")
    if quality:
        markdown = replace_section(markdown, "quality", render_quality(quality))
    memory = _load(f"memory{suffix}.json")
    if memory:
        markdown = replace_section(markdown, "memory", render_memory(memory))
    sample, serving = _load(f"sample_speed{suffix}.json"), _load(f"serving_speed{suffix}.json")
    if sample or serving:
        markdown = replace_section(markdown, "generation", render_generation(sample, serving))
    if serving:
        markdown = replace_section(markdown, "serving", render_serving(serving))
    BENCHMARKS_MD.write_text(markdown)
    print(f"rewrote {BENCHMARKS_MD}", flush=True)


if __name__ == "__main__":
    main()
