"""Medians over the fresh-process samples, ratios to the peers, and the markdown report."""

from __future__ import annotations

import statistics

ENGINE_ORDER = ("flagopt", "transformers", "ctranslate2")
PEERS = ("transformers", "ctranslate2")
# (key, label, higher is better) for the ratio summary.
SUMMARY_METRICS = (
    ("decode_tok_s", "batch-1 decode tok/s", True),
    ("batch{b0}_tok_s", "batch {b0} tok/s", True),
    ("batch{b1}_tok_s", "batch {b1} tok/s", True),
    ("prefill_tok_s", "prefill {p} tok/s", True),
    ("ttft_s", "TTFT", False),
    ("load_s", "load", False),
    ("peak_rss_end_bytes", "peak RSS", False),
    ("gpu_max_allocated_end_bytes", "peak GPU memory", False),
)


def medians(samples: list[dict]) -> dict:
    """Median of every numeric field present in all samples."""
    if not samples:
        return {}
    keys = [k for k, v in samples[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and all(k in s for s in samples)]
    return {k: statistics.median(s[k] for s in samples) for k in keys}


def spreads(samples: list[dict]) -> dict:
    """(min, max) of each median-able field, to judge the noise."""
    return {k: [min(s[k] for s in samples), max(s[k] for s in samples)]
            for k in medians(samples)}


def best(configs: list[dict], engine: str, key: str, higher: bool) -> dict | None:
    """The engine's configuration with the best median ``key`` (None when none measured it)."""
    rows = [c for c in configs if c["engine"] == engine and c["status"] == "ok"
            and key in c["median"]]
    if not rows:
        return None
    pick = max if higher else min
    return pick(rows, key=lambda c: c["median"][key])


def ratio(flag: float, peer: float, higher: bool) -> float:
    """> 1 means flagopt is better: flagopt/peer for rates, peer/flagopt for costs."""
    return flag / peer if higher else peer / flag


def ceiling(config: dict, read_gb_s: float | None) -> tuple[float | None, float | None]:
    """Batch-1 decode bandwidth ceiling (tok/s) and the fraction of it achieved."""
    m = config["median"]
    if not read_gb_s or not m.get("bytes_per_token") or "decode_tok_s" not in m:
        return None, None
    top = read_gb_s * 1e9 / m["bytes_per_token"]
    return top, m["decode_tok_s"] / top


def ratios(configs: list[dict], keys: dict[str, str]) -> list[dict]:
    """flagopt best vs each peer's best, per metric (for the JSON and the summary table)."""
    rows = []
    for key_t, label_t, higher in SUMMARY_METRICS:
        key, label = key_t.format(**keys), label_t.format(**keys)
        row = {"metric": key, "label": label, "higher_is_better": higher}
        for engine in ENGINE_ORDER:
            c = best(configs, engine, key, higher)
            row[engine] = None if c is None else {"variant": c["variant"],
                                                  "value": c["median"][key]}
        flag = row["flagopt"]
        if flag is None or not any(row[p] for p in PEERS):
            continue
        for peer in PEERS:
            row[f"flagopt_vs_{peer}"] = ratio(flag["value"], row[peer]["value"], higher) \
                if row[peer] and flag["value"] and row[peer]["value"] else None
        rows.append(row)
    return rows


# ---- markdown --------------------------------------------------------------------------------

def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    if unit == "ms":
        x *= 1e3
    digits = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2
    return f"{x:.{digits}f}"


def _gb(x: float | None) -> str:
    return "–" if x is None else f"{x / 1e9:.2f}"


def _times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _value(key: str, value: float) -> str:
    if key.endswith("_bytes"):
        return f"{value / 1e9:.2f} GB"
    if key == "ttft_s":
        return f"{value * 1e3:.1f} ms"
    if key.endswith("_s") and not key.endswith("tok_s"):
        return f"{value:.2f} s"
    return _num(value)


def model_table(model: str, configs: list[dict], settings: dict, read_gb_s: float | None,
                peers: list[str], note: str | None = None) -> list[str]:
    b = settings["batch_sizes"]
    peer_best = {p: best(configs, p, "decode_tok_s", True) for p in peers}
    cuda = settings["device"].startswith("cuda")
    head = ["engine", "dtype", "batch-1 tok/s"]
    head += [f"× {p} best" for p in peers]
    head += ["% of ceiling"] + [f"batch {x} tok/s" for x in b]
    head += [f"prefill {settings['prefill_len']} tok/s", "TTFT ms", "load s",
             "load RSS ÷ weights", "peak RSS GB / weights GB"] + (["peak GPU GB"] if cuda else [])
    head += ["same tokens", "draft accepted"]
    lines = [f"## {model}", ""] + ([note, ""] if note else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for c in configs:
        m = c["median"]
        row = [c["engine"], c["label"]]
        if c["status"] != "ok":
            row += [_cell(f"{c['status']}: {c['reason']}")] + [""] * (len(head) - 3)
            lines.append("| " + " | ".join(row) + " |")
            continue
        row.append(_num(m.get("decode_tok_s")))
        for p in peers:
            pb = peer_best[p]
            row.append(_times(m["decode_tok_s"] / pb["median"]["decode_tok_s"])
                       if pb and "decode_tok_s" in m else "–")
        _, frac = ceiling(c, read_gb_s)
        row.append("–" if frac is None else f"{100 * frac:.0f}%")
        row += [_num(m.get(f"batch{x}_tok_s")) for x in b]
        row += [_num(m.get("prefill_tok_s")), _num(m.get("ttft_s"), "ms"),
                _num(m.get("load_s")), _load_rss(m),
                f"{_gb(m.get('peak_rss_end_bytes'))} / {_gb(m.get('weights_bytes'))}"]
        if cuda:
            row.append(_gb(m.get("gpu_max_allocated_end_bytes")))
        row += [_same(c.get("same_tokens")), "–" if m.get("acceptance_rate") is None
                else f"{100 * m['acceptance_rate']:.0f}%"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _same(same: dict | None) -> str:
    """Whether the batch-1 greedy tokens are transformers' float32 ones."""
    if same is None:
        return "–"
    return "yes" if same["same"] else f"no (from token {same['first_difference']})"


def _load_rss(m: dict) -> str:
    """Peak RSS the load added over the process baseline, as a multiple of the weights."""
    keys = ("peak_rss_after_load_bytes", "peak_rss_baseline_bytes", "weights_bytes")
    if not all(m.get(k) for k in keys):
        return "–"
    return f"{(m[keys[0]] - m[keys[1]]) / m[keys[2]]:.2f}×"


def summary_table(rows: list[dict], peers: list[str]) -> list[str]:
    if not rows:
        return []
    head = ["metric", *ENGINE_ORDER[:1], *peers] + [f"flagopt vs {p}" for p in peers]
    lines = ["", "Best of each engine, and flagopt's advantage (> 1× = flagopt better: "
             "flagopt ÷ peer for rates, peer ÷ flagopt for times and memory):", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["label"]]
        for engine in ("flagopt", *peers):
            v = r.get(engine)
            cells.append("–" if v is None else
                         f"{_value(r['metric'], v['value'])} ({v['variant']})")
        cells += [_times(r.get(f"flagopt_vs_{p}")) for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _load_line(m: dict) -> str:
    start, end = m.get("loadavg_start"), m.get("loadavg_end")
    line = f"- load average (1 min) at start / end: {start:.1f} / {end:.1f}"
    if start > 0.5 * m["usable_cpus"]:  # before any worker ran; at the end it counts ours
        line += (f" on {m['usable_cpus']} CPUs: the machine was busy, so absolute numbers "
                 f"are noisy (ratios less so)")
    return line


def markdown(doc: dict) -> str:
    s, m = doc["settings"], doc["machine"]
    bw = doc["membw"]["median"]
    lines = [f"# flagopt benchmark, {doc['date']}", "",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']:.0f} GiB RAM"
             + (f", {m['gpu']}" if m.get("gpu") else "") + f"; device `{s['device']}`, "
             f"{s['threads']} threads per engine",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
             f"- command: `{doc['command']}`",
             f"- {s['repeats']} repeat(s); every configuration in a fresh process, "
             f"round-robin across engines; medians shown (raw samples in the JSON)",
             f"- batch-1: prompt {s['prompt_len']}, {s['new_tokens']} new tokens (greedy, EOS "
             f"off); batch {', '.join(map(str, s['batch_sizes']))}: "
             f"{s['batch_new_tokens']} new tokens; prefill: {s['prefill_len']} tokens",
             _load_line(m),
             f"- memory bandwidth: read {_num(bw.get('read_gb_s'))} GB/s, copy "
             f"{_num(bw.get('copy_gb_s'))} GB/s (read + write); ceiling = read ÷ weight "
             f"bytes per token", ""]
    peers = [p for p in PEERS if any(c["engine"] == p for c in doc["configs"])]
    for model in s["models"]:
        configs = [c for c in doc["configs"] if c["model"] == model]
        if doc.get("model_errors", {}).get(model):
            lines += [f"## {model}", "", f"not run: {doc['model_errors'][model]}", ""]
            continue
        ms = {**s, **doc["model_settings"].get(model, {})}
        note = None
        if (ms["metrics"], ms["new_tokens"]) != (s["metrics"], s["new_tokens"]):
            note = (f"Light suite for this size: {', '.join(ms['metrics'])}, batch-1 decode of "
                    f"{ms['new_tokens']} new tokens.")
        lines += model_table(model, configs, ms, bw.get("read_gb_s"), peers, note)
        lines += summary_table(doc["ratios"].get(model, []), peers) + [""]
    return "\n".join(lines)
