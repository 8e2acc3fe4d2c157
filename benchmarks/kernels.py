"""The CPU kernels alone: each op under ``ssm_backend`` torch (the pure-PyTorch reference) and numba
(the compiled kernels), forward and forward + backward, timed side by side; and the kernels' first-call
cost, compiled into an empty Numba cache and then loaded from it.

    python -m benchmarks.kernels                       # the models' shapes at L = 50, 200, 2000
    python -m benchmarks.kernels --threads 2 --rounds 3 --shapes 2048x50 8x200

Shapes are BxL at the models' default width (hidden 64, expand 2: d_inner 128; Mamba-1 d_state 32;
Mamba-2 / Hydra 8 heads of 16, d_state 32; convolution over Mamba-2's 256 channels, width 4; gated
RMSNorm over 128 features). Timings: CPU time of the process, the median of --rounds calls alternating
between the backends. Writes kernels.json and kernels.md into --output-dir.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

DEFAULT_SHAPES = ["2048x50", "256x200", "8x200", "8x2000", "1x2000"]
D_INNER, D_STATE, HEADS, HEADDIM, CONV_CHANNELS, D_CONV = 128, 32, 8, 16, 256, 4
FIRST_CALL_PREFIX = "KERNELS_FIRST_CALL "


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxL (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per backend (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=common.DEFAULT_OUTPUT_DIR,
                        help="where the JSON and Markdown go (default: benchmarks/results)")
    parser.add_argument("--first-calls", action="store_true", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes]
    except ValueError:
        parser.error(f"shapes must be BxL, e.g. 2048x50; got {args.shapes}")
    if any(len(shape) != 2 or min(shape) < 1 for shape in args.shapes) or args.rounds < 1 or args.threads < 1:
        parser.error("shapes BxL with B, L >= 1; rounds and threads >= 1")
    return args


def op_calls(batch, length):
    """{op name: a function of the backend running the op once on fresh random inputs}; the inputs
    that take gradients are returned with the output."""
    import torch

    from recbole_ssm.ops.conv import depthwise_conv1d
    from recbole_ssm.ops.gated_rmsnorm import gated_rmsnorm
    from recbole_ssm.ops.hydra import hydra_mixer
    from recbole_ssm.ops.selective_scan import selective_scan
    from recbole_ssm.ops.ssd import ssd_scan

    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).requires_grad_()

    def rand(*shape, low=0.0, high=1.0):
        return (torch.rand(*shape, generator=generator) * (high - low) + low).requires_grad_()

    b, l = batch, length
    mamba = dict(u=randn(b, D_INNER, l), delta=randn(b, D_INNER, l, scale=0.5), A=rand(D_INNER, D_STATE, low=-32, high=-1),
                 B=randn(b, D_STATE, l), C=randn(b, D_STATE, l), D=randn(D_INNER), z=randn(b, D_INNER, l),
                 delta_bias=randn(D_INNER, scale=0.1))
    ssd = dict(x=randn(b, l, HEADS, HEADDIM), dt=rand(b, l, HEADS, low=0.01, high=0.2), A=rand(HEADS, low=-16, high=-1),
               B=randn(b, l, 1, D_STATE), C=randn(b, l, 1, D_STATE), D=randn(HEADS))
    hydra = dict(x=ssd["x"], dt_fwd=ssd["dt"], dt_bwd=rand(b, l, HEADS, low=0.01, high=0.2), A=ssd["A"],
                 B_fwd=ssd["B"], C_fwd=ssd["C"], B_bwd=randn(b, l, 1, D_STATE), C_bwd=randn(b, l, 1, D_STATE),
                 D=randn(b, l, HEADS))
    conv = dict(x=randn(b, CONV_CHANNELS, l), weight=randn(CONV_CHANNELS, 1, D_CONV, scale=0.5),
                bias=randn(CONV_CHANNELS))
    norm = dict(x=randn(b, l, D_INNER), weight=rand(D_INNER, low=0.5, high=1.5), z=randn(b, l, D_INNER))
    return {
        "selective_scan (Mamba-1)": (lambda backend: selective_scan(**mamba, delta_softplus=True, backend=backend),
                                     mamba),
        "ssd_scan (Mamba-2)": (lambda backend: ssd_scan(**ssd, chunk_size=64, backend=backend), ssd),
        "hydra_mixer (two SSD scans)": (lambda backend: hydra_mixer(**hydra, chunk_size=64, backend=backend), hydra),
        "depthwise_conv1d + SiLU": (lambda backend: depthwise_conv1d(**conv, causal=True, activation="silu",
                                                                     backend=backend), conv),
        "gated_rmsnorm": (lambda backend: gated_rmsnorm(**norm, norm_before_gate=False, backend=backend), norm),
    }


def timed(fn):
    start = time.process_time()
    fn()
    return time.process_time() - start


def measure(args):
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for batch, length in args.shapes:
        for name, (run, inputs) in op_calls(batch, length).items():
            def forward(backend):
                with torch.no_grad():
                    run(backend)

            def forward_backward(backend):
                for t in inputs.values():
                    t.grad = None
                out = run(backend)
                out.backward(torch.ones_like(out))

            row = {"op": name, "batch": batch, "length": length}
            for kind, fn in (("forward", forward), ("forward_backward", forward_backward)):
                samples = {"torch": [], "numba": []}
                for backend in samples:
                    fn(backend)  # warm-up
                for _ in range(args.rounds):
                    for backend in samples:
                        samples[backend].append(timed(lambda: fn(backend)))
                row[kind] = {backend: common.summarize_ms(s) for backend, s in samples.items()}
            rows.append(row)
            common.progress(f"{name} {batch}x{length}: forward {row['forward']['torch']['median']:.1f} -> "
                            f"{row['forward']['numba']['median']:.1f} ms, forward+backward "
                            f"{row['forward_backward']['torch']['median']:.1f} -> "
                            f"{row['forward_backward']['numba']['median']:.1f} ms")
    return rows


def one_user_mixer_calls():
    """{name: a function running a block's compiled path without gradients (the inference path) for
    one user of length 5}: on two threads, that user's work is shared out over torch's OpenMP team,
    whose callbacks compile on first use too."""
    import torch

    from recbole_ssm.ops.selective_mixer import selective_mixer_no_grad
    from recbole_ssm.ops.ssd_mixer import ssd_mixer_no_grad

    l, bc = 5, 2 * 2 * D_STATE                     # Hydra: (B, C) of two directions
    mamba = dict(x=torch.randn(1, D_INNER, l), z=torch.randn(1, D_INNER, l),
                 conv_weight=torch.randn(D_INNER, 1, D_CONV), conv_bias=torch.randn(D_INNER),
                 x_proj_weight=torch.randn(4 + 2 * D_STATE, D_INNER) * 0.1,
                 dt_proj_weight=torch.randn(D_INNER, 4), dt_proj_bias=torch.randn(D_INNER),
                 A_log=torch.randn(D_INNER, D_STATE), D=torch.randn(D_INNER))
    hydra = dict(xBC=torch.randn(1, l, D_INNER + bc), dt=torch.rand(1, l, 2, HEADS), z=torch.randn(1, l, D_INNER),
                 conv_weight=torch.randn(D_INNER + bc, 1, 7), conv_bias=torch.randn(D_INNER + bc), causal=False,
                 A=-torch.rand(HEADS), D=torch.randn(HEADS), fc_D_weight=torch.randn(HEADS, D_INNER),
                 norm_weight=torch.randn(D_INNER), eps=1e-5, group_size=D_INNER, norm_before_gate=True,
                 headdim=HEADDIM, d_state=D_STATE, ngroups=1)
    return {"Mamba-1 block without gradients, one user, 2 threads": lambda: selective_mixer_no_grad(**mamba),
            "Hydra block without gradients, one user, 2 threads": lambda: ssd_mixer_no_grad(**hydra)}


def first_calls():
    """Seconds of each op's first forward + backward call (batch 2, length 5) in this process, then of
    the first inference call of a Mamba-1 and a Hydra block for one user on two threads."""
    import torch

    seconds = {}
    for name, (run, inputs) in op_calls(2, 5).items():
        start = time.perf_counter()
        out = run("numba")
        out.backward(torch.ones_like(out))
        seconds[name] = time.perf_counter() - start
    torch.set_num_threads(2)
    for name, run in one_user_mixer_calls().items():
        start = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - start
    return seconds


def measure_first_calls():
    """First calls in two fresh processes sharing an empty Numba cache: compiling, then loading."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="recbole-ssm-numba-cache-") as cache:
        for stage in ("compile", "load_from_cache"):
            done = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--first-calls"],
                                  cwd=common.REPO_ROOT, capture_output=True, text=True,
                                  env={**os.environ, "NUMBA_CACHE_DIR": cache})
            lines = [line for line in done.stdout.splitlines() if line.startswith(FIRST_CALL_PREFIX)]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"first-call measurement ({stage}) failed:\n{done.stderr[-3000:]}")
            results[stage] = json.loads(lines[-1][len(FIRST_CALL_PREFIX):])
    return results


def render_markdown(report):
    s = report["settings"]
    lines = ["# CPU kernels: numba against torch", "", f"Machine: {common.machine_line(report['machine'])}.", "",
             f"torch threads {s['threads']}; median CPU time of {s['rounds']} calls per backend, alternating.", ""]
    rows = []
    for row in report["rows"]:
        cells = [row["op"], f"{row['batch']}x{row['length']}"]
        for kind in ("forward", "forward_backward"):
            torch_ms, numba_ms = (row[kind][b]["median"] for b in ("torch", "numba"))
            cells += [f"{torch_ms:.1f}", f"{numba_ms:.1f}", f"{torch_ms / numba_ms:.1f}x"]
        rows.append(cells)
    lines.append(common.markdown_table(
        ["op", "BxL", "forward torch (ms)", "forward numba (ms)", "speed-up",
         "fwd+bwd torch (ms)", "fwd+bwd numba (ms)", "speed-up"], rows))
    first = report["first_calls"]
    lines += ["", "First forward + backward call of each op in a fresh process (seconds), then the first "
              "inference call of two blocks for one user on two threads (their one-call kernels and the "
              "OpenMP team's callbacks): compiling into an empty Numba cache, then loading from that cache "
              "(`NUMBA_CACHE_DIR`; by default Numba caches next to the package, or in its user cache folder "
              "when that is not writable). The first op's figures include importing Numba; Hydra's mixer "
              "runs the SSD kernels, compiled by then, and the blocks reuse the kernels compiled before them.",
              ""]
    lines.append(common.markdown_table(["op", "compile (s)", "load from cache (s)"], [
        [name, f"{first['compile'][name]:.2f}", f"{first['load_from_cache'][name]:.2f}"] for name in first["compile"]]
        + [["total", f"{sum(first['compile'].values()):.1f}", f"{sum(first['load_from_cache'].values()):.1f}"]]))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.first_calls:
        print(FIRST_CALL_PREFIX + json.dumps(first_calls()), flush=True)
        return 0
    report = {"benchmark": "kernels",
              "settings": {"shapes": [f"{b}x{l}" for b, l in args.shapes], "threads": args.threads,
                           "rounds": args.rounds},
              "machine": common.machine_info("cpu")}
    report["first_calls"] = measure_first_calls()
    report["rows"] = measure(args)
    common.save_reports(report, args.output_dir / "kernels", render_markdown)
    return 0


if __name__ == "__main__":
    common.import_recbole_ssm()
    sys.exit(main())
