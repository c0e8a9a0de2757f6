#!/usr/bin/python3
"""Summarises the raw measurements of bench/run.sh into a table and JSON.

Usage (bench/run.sh calls it):
    /usr/bin/python3 bench/report.py RAW.jsonl OUT.json [--markdown OUT.md]
        [--baseline bench/baseline.json --guard GUARD.jsonl]

RAW.jsonl holds one JSON object per line: the lines of bench_train_step and
bench/torch_step.py (each tagged by run.sh with "row" and "round") and the
lines of bench_peak (tagged "kind": "peak"). For every row and framework the
rounds are combined as: median = median of the rounds' medians, min = the
lowest repeat, max = the highest repeat. PyTorch is reported in the layout
(NCHW or channels_last) whose combined median is higher, with that layout's
peak RSS; so is PyTorch's bf16 autocast (lines with "precision": "bf16"),
which kd bf16 is compared with (kd bf16/PT bf16). A second table lists the
oneDNN implementations of each row's convolutions (the lines' "impls": kd
f32, kd bf16, and PyTorch f32 / bf16 in the layout the first table reports). The machine's peak is the highest bench_peak figure of the run.
With --baseline, also writes the regression-guard baseline (bench/guard.sh)
from GUARD.jsonl (bench/guard.sh --measure) plus this run's rows.
"""
import json
import statistics
import sys
import time


def load(path):
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                out.append(json.loads(line))
    return out


def combine(ms):
    """One framework/layout/row over several rounds."""
    return {
        "img_s_median": round(statistics.median(m["img_s_median"] for m in ms), 2),
        "img_s_min": min(m["img_s_min"] for m in ms),
        "img_s_max": max(m["img_s_max"] for m in ms),
        "flops_per_image": ms[0]["flops_per_image"],
        "peak_rss_mib": max(m["peak_rss_mib"] for m in ms),
        "rss_start_mib": max(m["rss_start_mib"] for m in ms),
        "rounds": len(ms),
        "repeats_x_steps": [ms[0]["repeats"], ms[0]["steps"]],
        **({"blas": ms[0]["blas"]} if "blas" in ms[0] else {}),
        **({"impls": ms[0]["impls"]} if "impls" in ms[0] else {}),
    }


def summarise(raw):
    peaks = [r for r in raw if r.get("kind") == "peak"]
    peak = max(p["peak_gflops"] for p in peaks) if peaks else None
    rows, order = {}, []
    for r in raw:
        if r.get("kind") == "peak":
            continue
        key = r["row"]
        if key not in rows:
            rows[key] = {}
            order.append(key)
        if r["framework"] == "kd":
            fw = "kd:bf16" if r.get("precision") == "bf16" else "kd"
        elif r.get("precision") == "bf16":
            fw = "pytorch-bf16:" + r["layout"]
        else:
            fw = "pytorch:" + r["layout"]
        rows[key].setdefault(fw, []).append(r)
    out = []
    for key in order:
        d = rows[key]
        row = {"row": key}
        if "kd" in d:
            row["kd"] = combine(d["kd"])
        torch = {fw[len("pytorch:"):]: combine(ms) for fw, ms in d.items() if fw.startswith("pytorch:")}
        if torch:
            best = max(torch, key=lambda k: torch[k]["img_s_median"])
            row["pytorch"] = dict(torch[best], layout=best)
            row["pytorch_layouts"] = {k: v["img_s_median"] for k, v in torch.items()}
        torch_bf = {fw[len("pytorch-bf16:"):]: combine(ms) for fw, ms in d.items()
                    if fw.startswith("pytorch-bf16:")}
        if torch_bf:
            best = max(torch_bf, key=lambda k: torch_bf[k]["img_s_median"])
            row["pytorch_bf16"] = dict(torch_bf[best], layout=best)
            row["pytorch_bf16_layouts"] = {k: v["img_s_median"] for k, v in torch_bf.items()}
            if "pytorch" in row:
                row["ratio_pytorch_bf16_over_fp32"] = round(
                    row["pytorch_bf16"]["img_s_median"] / row["pytorch"]["img_s_median"], 3)
        if "kd:bf16" in d:
            row["kd_bf16"] = combine(d["kd:bf16"])
            b = row["kd_bf16"]["img_s_median"]
            if "kd" in row:
                row["ratio_bf16_over_fp32"] = round(b / row["kd"]["img_s_median"], 3)
            if "pytorch" in row:
                row["ratio_bf16_over_pytorch"] = round(b / row["pytorch"]["img_s_median"], 3)
            if "pytorch_bf16" in row:
                row["ratio_bf16_over_pytorch_bf16"] = round(b / row["pytorch_bf16"]["img_s_median"], 3)
        if "kd" in row and "pytorch" in row:
            row["ratio_kd_over_pytorch"] = round(row["kd"]["img_s_median"] / row["pytorch"]["img_s_median"], 3)
            if row["kd"]["flops_per_image"] != row["pytorch"]["flops_per_image"]:
                row["flops_mismatch"] = [row["kd"]["flops_per_image"], row["pytorch"]["flops_per_image"]]
        if "kd" in row:
            g = row["kd"]["img_s_median"] * row["kd"]["flops_per_image"] * 1e-9
            row["kd"]["gflops_median"] = round(g, 2)
            if peak:
                row["kd"]["pct_of_peak"] = round(100.0 * g / peak, 2)
        if "pytorch" in row:
            g = row["pytorch"]["img_s_median"] * row["pytorch"]["flops_per_image"] * 1e-9
            row["pytorch"]["gflops_median"] = round(g, 2)
            if peak:
                row["pytorch"]["pct_of_peak"] = round(100.0 * g / peak, 2)
        out.append(row)
    return {"peak_gflops": peak, "peak_runs": [p["peak_gflops"] for p in peaks],
            "peak_isa": peaks[0]["isa"] if peaks else None, "rows": out}


def table(s):
    hdr = ("row", "kd img/s med [min-max]", "PyTorch img/s med [min-max] (layout)", "kd/PT",
           "kd GFLOP/s (% peak)", "GFLOP/img", "peak RSS kd / PT (MiB)")
    bf = any("kd_bf16" in r for r in s["rows"])
    pbf = any("pytorch_bf16" in r for r in s["rows"])
    if bf:
        hdr += ("kd bf16 img/s med [min-max]", "bf16/fp32", "bf16/PT f32", "bf16 RSS (MiB)")
    if pbf:
        hdr += ("PT bf16 img/s med [min-max] (layout)", "PT bf16/f32", "kd bf16/PT bf16")
    lines = []
    for r in s["rows"]:
        k, p = r.get("kd"), r.get("pytorch")
        kd_s = f"{k['img_s_median']:.1f} [{k['img_s_min']:.1f}-{k['img_s_max']:.1f}]" if k else "-"
        pt_s = (f"{p['img_s_median']:.1f} [{p['img_s_min']:.1f}-{p['img_s_max']:.1f}] ({p['layout']})"
                if p else "-")
        ratio = f"{r['ratio_kd_over_pytorch']:.2f}" if "ratio_kd_over_pytorch" in r else "-"
        gf = f"{k['gflops_median']:.1f} ({k.get('pct_of_peak', 0):.1f}%)" if k else "-"
        fl = f"{(k or p)['flops_per_image'] * 1e-9:.3f}"
        rss = f"{k['peak_rss_mib']:.0f} / {p['peak_rss_mib']:.0f}" if k and p else (
            f"{k['peak_rss_mib']:.0f} / -" if k else "-")
        line = (r["row"], kd_s, pt_s, ratio, gf, fl, rss)
        if bf:
            b = r.get("kd_bf16")
            line += ((f"{b['img_s_median']:.1f} [{b['img_s_min']:.1f}-{b['img_s_max']:.1f}]",
                      f"{r['ratio_bf16_over_fp32']:.2f}" if "ratio_bf16_over_fp32" in r else "-",
                      f"{r['ratio_bf16_over_pytorch']:.2f}" if "ratio_bf16_over_pytorch" in r else "-",
                      f"{b['peak_rss_mib']:.0f}") if b else ("-", "-", "-", "-"))
        if pbf:
            q = r.get("pytorch_bf16")
            line += ((f"{q['img_s_median']:.1f} [{q['img_s_min']:.1f}-{q['img_s_max']:.1f}] ({q['layout']})",
                      f"{r['ratio_pytorch_bf16_over_fp32']:.2f}" if "ratio_pytorch_bf16_over_fp32" in r else "-",
                      f"{r['ratio_bf16_over_pytorch_bf16']:.2f}" if "ratio_bf16_over_pytorch_bf16" in r else "-")
                     if q else ("-", "-", "-"))
        lines.append(line)
    return hdr, lines


def impl_cell(m):
    """One measurement's "impls" as "fwd X; bwd-d Y; bwd-w Z" (kinds the row has)."""
    if not m or "impls" not in m:
        return "-"
    im = m["impls"]
    parts = [f"{label} {im[k]}" for k, label in (("fwd", "fwd"), ("bwd_data", "bwd-d"), ("bwd_weights", "bwd-w"))
             if im.get(k)]
    return "; ".join(parts) if parts else "no oneDNN conv"


def impl_table(s):
    """The oneDNN convolution implementations of every row, per framework and precision."""
    hdr = ("row", "kd f32", "kd bf16", "PyTorch f32", "PyTorch bf16")
    lines = []
    for r in s["rows"]:
        p, q = r.get("pytorch"), r.get("pytorch_bf16")
        lines.append((r["row"], impl_cell(r.get("kd")), impl_cell(r.get("kd_bf16")),
                      impl_cell(p) + (f" ({p['layout']})" if p and "impls" in p else ""),
                      impl_cell(q) + (f" ({q['layout']})" if q and "impls" in q else "")))
    if all(all(c == "-" for c in x[1:]) for x in lines):
        return hdr, []
    return hdr, lines


def main():
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    raw, out_json = args[0], args[1]
    opts = dict(zip(args[2::2], args[3::2]))
    s = summarise(load(raw))
    s["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(out_json, "w") as f:
        json.dump(s, f, indent=1)
        f.write("\n")
    hdr, lines = table(s)
    w = [max(len(x[i]) for x in [hdr] + lines) for i in range(len(hdr))]
    print(f"measured fp32 peak ({s['peak_isa']}, 2 threads): {s['peak_gflops']} GFLOP/s "
          f"(runs: {', '.join(str(p) for p in s['peak_runs'])})")
    for x in [hdr] + lines:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(x)))
    ihdr, ilines = impl_table(s)
    if ilines:
        print("oneDNN convolution implementations (fwd / bwd-data / bwd-weights):")
        for x in ilines:
            print("  " + " | ".join(x))
    for r in s["rows"]:
        if "flops_mismatch" in r:
            print(f"WARNING: {r['row']}: kd and PyTorch count different FLOPs {r['flops_mismatch']}")
    if "--markdown" in opts:
        with open(opts["--markdown"], "w") as f:
            f.write(f"Measured fp32 peak ({s['peak_isa']}, 2 threads): {s['peak_gflops']} GFLOP/s\n\n")
            f.write("| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr) + "\n")
            for x in lines:
                f.write("| " + " | ".join(x) + " |\n")
            if ilines:
                f.write("\noneDNN implementations of the convolutions (fwd: forward, bwd-d: backward "
                        "data, bwd-w: backward weights; '+' joins several):\n\n")
                f.write("| " + " | ".join(ihdr) + " |\n|" + "---|" * len(ihdr) + "\n")
                for x in ilines:
                    f.write("| " + " | ".join(x) + " |\n")
    if "--baseline" in opts:
        guard = load(opts["--guard"])
        # The highest peak of the whole run: under load the FMA loop is slowed
        # less than kd, so a low peak would inflate the fraction and make the
        # guard fail later on a quiet machine; the highest peak keeps it lenient.
        gpeak = max([g["peak_gflops"] for g in guard if g.get("kind") == "peak"] + [s["peak_gflops"] or 0])
        with open(opts["--baseline"], "w") as f:
            f.write("{\n")
            f.write(' "about": "Baseline of bench/guard.sh (CI regression guard) and of bench/run.sh. '
                    'guard: kd training step, best repeat, as a fraction of the measured fp32 peak; '
                    'guard.sh fails when a row falls below half its fraction_of_peak. '
                    'rows: the kd/PyTorch comparison of the run that wrote this file.",\n')
            f.write(f' "date": "{s["date"]}",\n')
            f.write(f' "source": "{opts.get("--source", "bench/run.sh --write-baseline")}",\n')
            f.write(f' "peak_gflops": {s["peak_gflops"]},\n')
            gisa = [g["isa"] for g in guard if g.get("kind") == "peak"][0]
            f.write(f' "peak_isa": "{gisa}",\n')
            f.write(' "guard": {\n')
            grows = [g for g in guard if g.get("framework") == "kd"]
            for i, g in enumerate(grows):
                frac = g["gflops_max"] / gpeak
                f.write(f'  "{g["model"]}": {{"batch": {g["batch"]}, "img_s": {g["img_s_max"]}, '
                        f'"gflops": {g["gflops_max"]}, "peak_gflops": {gpeak}, '
                        f'"fraction_of_peak": {frac:.4f}}}{"," if i + 1 < len(grows) else ""}\n')
            f.write(' },\n "rows": {\n')
            rows = [r for r in s["rows"] if "kd" in r]
            for i, r in enumerate(rows):
                pt = r.get("pytorch")
                f.write(f'  "{r["row"]}": {{"kd_img_s": {r["kd"]["img_s_median"]}, '
                        f'"pytorch_img_s": {pt["img_s_median"] if pt else "null"}, '
                        f'"pytorch_layout": {json.dumps(pt["layout"]) if pt else "null"}, '
                        f'"ratio_kd_over_pytorch": {r.get("ratio_kd_over_pytorch", "null")}, '
                        f'"kd_pct_of_peak": {r["kd"].get("pct_of_peak", "null")}}}'
                        f'{"," if i + 1 < len(rows) else ""}\n')
            f.write(" }\n}\n")
        json.load(open(opts["--baseline"]))  # must parse


if __name__ == "__main__":
    main()
