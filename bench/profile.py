#!/usr/bin/env python3
"""Where a training step's time goes: kd and PyTorch, primitive by primitive.

    python3 bench/profile.py [--model resnet32x4] [--mode train|infer]
        [--precision f32|bf16] [--no-torch] [--threads 2] [--batch 64]
        [--out bench/results/profile-<model>-<precision>.md]

For kd (build/bench/bench_train_step) and for PyTorch (bench/torch_step.py in
NCHW and channels_last, run by /usr/bin/python3), on the same model, batch
and step, it:
  1. measures the step as bench/run.sh does (median img/s of the default
     warmup 5, 5 repeats of 10 steps), which gives the step's wall time;
  2. runs the same step twice more with oneDNN's verbose mode on
     (ONEDNN_VERBOSE=1: one line per executed primitive with its time;
     OMP_WAIT_POLICY=active, so that OpenMP's threads do not fall asleep
     while a line is printed), once
     with 3 timed steps and once with 13, and takes the difference of the two
     runs' per-primitive sums divided by 10: the time per step of each kind of
     primitive (convolution forward / backward data / backward weights by
     implementation, batch norm, eltwise, reorder, pooling, ...), free of the
     setup, warm-up and FLOP-counting work both runs share;
  3. prints, per kind, ms per step, its share of the step, and for the
     convolutions the GFLOP/s (2 * MACs from oneDNN's own problem descriptor)
     and its fraction of the fp32 peak that bench_peak measures first.
"Outside oneDNN" is the step time less every primitive's time: kd's own
kernels (losses, SGD, pooling where oneDNN does not run it, gradient
accumulation), PyTorch's ATen kernels, the frameworks' overheads and the
verbose mode's own cost.

Needs only the Python standard library; PyTorch's rows need /usr/bin/python3
with torch (Debian's python3-torch links the same system oneDNN).
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASS = {"forward_training": "fwd", "forward_inference": "fwd", "forward": "fwd",
        "backward_data": "bwd_d", "backward_weights": "bwd_w", "backward": "bwd",
        "undef": ""}


def conv_flops(desc):
    """2 * MACs of one convolution from oneDNN's problem descriptor."""
    v = {}
    for k, n in re.findall(r"([a-z]+)(\d+)", desc):
        v.setdefault(k, int(n))
    g = v.get("g", 1)
    od, kd = v.get("od", 1), v.get("kd", 1)
    return 2.0 * v["mb"] * v["oc"] * v["oh"] * v["ow"] * od * (v["ic"] // g) * v["kh"] * v["kw"] * kd


def env_for(framework, threads, cpuinfo):
    """Each framework's environment, by bench/run.sh's rules (the reference:
    keep the two in step): OpenMP settings cleared so each framework gets its
    own default; PyTorch gets OpenBLAS (KD_BENCH_TORCH_BLAS, default Debian's
    openblas-pthread; "system" keeps the system libblas) with as many threads,
    and OPENBLAS_CORETYPE=SkylakeX on AVX-512 CPUs."""
    env = dict(os.environ)
    for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KD_OMP_TUNED", "OMP_NUM_THREADS",
              "ONEDNN_VERBOSE", "DNNL_VERBOSE"):
        env.pop(k, None)
    if framework == "torch":
        blas = os.environ.get("KD_BENCH_TORCH_BLAS", "/usr/lib/x86_64-linux-gnu/openblas-pthread")
        if blas != "system" and os.path.exists(os.path.join(blas, "libblas.so.3")):
            env["LD_LIBRARY_PATH"] = blas
            env["OPENBLAS_NUM_THREADS"] = str(threads)
            if re.search(r"\bavx512f\b", cpuinfo):
                env["OPENBLAS_CORETYPE"] = "SkylakeX"
    return env


def run(cmd, env):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit("profile: %s failed (exit %d): %s" % (" ".join(cmd), p.returncode, p.stderr[-2000:]))
    return p.stdout


def last_json(out):
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    sys.exit("profile: no JSON line in the output")


def prim_sums(out):
    """Per (primitive, pass, implementation): [ms, flops, count]."""
    s = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for line in out.splitlines():
        if not line.startswith("onednn_verbose,exec,") and not line.startswith("dnnl_verbose,exec,"):
            continue
        f = line.split(",")
        prim, impl, prop = f[3], f[4], PASS.get(f[5], f[5])
        ms = float(f[-1])
        key = (prim, prop, impl)
        s[key][0] += ms
        if prim == "convolution":
            s[key][1] += conv_flops(f[-2])
        s[key][2] += 1
    return s


def profile(name, base_cmd, env, steps_lo=3, steps_hi=13):
    clean = last_json(run(base_cmd, env))
    step_ms = 1000.0 * clean["batch"] / clean["img_s_median"]
    # OMP_WAIT_POLICY=active: printing each line takes long enough that
    # OpenMP's threads would otherwise fall asleep between primitives (kd's
    # binaries run with GOMP_SPINCOUNT=10000) and every primitive's time would
    # include waking them. It also keeps bench_train_step from re-executing.
    venv = dict(env, ONEDNN_VERBOSE="1", OMP_WAIT_POLICY="active")
    short = ["--warmup", "2", "--repeats", "1"]
    lo = prim_sums(run(base_cmd + short + ["--steps", str(steps_lo)], venv))
    hi = prim_sums(run(base_cmd + short + ["--steps", str(steps_hi)], venv))
    n = steps_hi - steps_lo
    rows = {}
    for k in set(lo) | set(hi):
        a, b = lo.get(k, [0, 0, 0]), hi.get(k, [0, 0, 0])
        ms, fl = (b[0] - a[0]) / n, (b[1] - a[1]) / n
        if ms > 0.005:
            rows[k] = (ms, fl)
    return {"name": name, "clean": clean, "step_ms": step_ms, "rows": rows}


def table(p, peak):
    out = []
    c = p["clean"]
    out.append("### %s: %.1f img/s, %.2f ms per step (%.1f GFLOP/s, %.1f%% of peak)\n" %
               (p["name"], c["img_s_median"], p["step_ms"], c["gflops_median"], 100 * c["gflops_median"] / peak))
    out.append("| primitive | pass | implementation | ms/step | share | GFLOP/s | % peak |")
    out.append("|---|---|---|---|---|---|---|")
    tot = 0.0
    groups = collections.defaultdict(float)
    for (prim, prop, impl), (ms, fl) in sorted(p["rows"].items(), key=lambda kv: -kv[1][0]):
        tot += ms
        groups[prim] += ms
        g = fl / ms / 1e6 if fl else 0
        out.append("| %s | %s | %s | %.2f | %.1f%% | %s | %s |" %
                   (prim, prop, impl, ms, 100 * ms / p["step_ms"],
                    "%.0f" % g if fl else "", "%.0f%%" % (100 * g / peak) if fl else ""))
    rest = p["step_ms"] - tot
    out.append("| outside oneDNN | | | %.2f | %.1f%% | | |" % (rest, 100 * rest / p["step_ms"]))
    out.append("")
    conv_ms = groups.get("convolution", 0.0)
    conv_fl = sum(fl for (prim, _, _), (_, fl) in p["rows"].items() if prim == "convolution")
    summ = ["%s %.1f%%" % (k, 100 * v / p["step_ms"]) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]
    out.append("Shares: %s, outside oneDNN %.1f%%. Convolutions alone: %.0f GFLOP/s (%.0f%% of peak)." %
               (", ".join(summ), 100 * rest / p["step_ms"], conv_fl / conv_ms / 1e6 if conv_ms else 0,
                100 * conv_fl / conv_ms / 1e6 / peak if conv_ms else 0))
    out.append("")
    return "\n".join(out), {"step_ms": p["step_ms"], "groups": dict(groups), "outside": rest,
                            "conv_gflops": conv_fl / conv_ms / 1e6 if conv_ms else 0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet32x4")
    ap.add_argument("--mode", default="train", choices=("train", "infer"))
    ap.add_argument("--precision", default="f32", choices=("f32", "bf16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--build", default=os.environ.get("KD_BENCH_BUILD", os.path.join(ROOT, "build")))
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    common = ["--model", a.model, "--mode", a.mode, "--threads", str(a.threads), "--batch", str(a.batch),
              "--precision", a.precision]
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    m = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    cpu = m.group(1).strip() if m else ""
    amx = "amx_bf16" in cpuinfo
    kd_env, torch_env = env_for("kd", a.threads, cpuinfo), env_for("torch", a.threads, cpuinfo)
    peak_line = last_json(run([os.path.join(a.build, "bench", "bench_peak"), "--threads", str(a.threads)], kd_env))
    peak = peak_line["peak_gflops"]
    runs = [profile("kd %s" % a.precision, [os.path.join(a.build, "bench", "bench_train_step")] + common, kd_env)]
    if not a.no_torch:
        for layout in ("nchw", "channels_last"):
            runs.append(profile("PyTorch %s %s" % (a.precision if a.precision == "f32" else "bf16 autocast", layout),
                                ["/usr/bin/python3", os.path.join(ROOT, "bench", "torch_step.py"), "--no-impls",
                                 "--layout", layout] + common, torch_env))
    md = ["# Step profile: %s %s, %s, batch %d, %d threads\n" % (a.model, a.mode, a.precision, a.batch, a.threads),
          "CPU: %s (%s); fp32 peak (bench_peak): %.1f GFLOP/s.\n" % (cpu, "AMX" if amx else "no AMX", peak),
          "Command: `python3 bench/profile.py --model %s --mode %s --precision %s`\n" % (a.model, a.mode, a.precision)]
    summary = {}
    for p in runs:
        text, s = table(p, peak)
        md.append(text)
        summary[p["name"]] = s
    text = "\n".join(md)
    print(text)
    print(json.dumps({"peak_gflops": peak, "cpu": cpu, "amx": amx, "runs": summary}))
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
