"""Pre-LLM scoring share on a CPU, in CPU time, old and new selectors side by side.

    python scripts/bench_prellm_share.py                          # this checkout vs main
    python scripts/bench_prellm_share.py --old-ref main --scorers cdpruner vispruner --rounds 7
    python scripts/bench_prellm_share.py --profile cdpruner       # cProfile of one scoring call

Why not `python -m sparsevlm_exp.bench`: the bench measures wall clock, which on a CPU
shared with other jobs swings by several x between repeats (docs/BENCHMARKS.md, runs 1-6).
This script uses the same model (conf/bench.yaml + model=bench_cpu, random weights), the
bench's own synthetic request (1,024 visual tokens by default) and the engine's own
"score" / "prefill" stages, but with ONE torch thread and the main thread's CPU time
(time.thread_time instead of perf_counter), which load on other cores barely moves.
The old selectors are the scorer modules as they are at --old-ref (git show), run in the
same process, interleaved round by round with the new ones, so that drift hits both alike.
Each round also checks that old and new keep the same tokens.

Numbers: medians over --rounds (after --warmup rounds) of the engine's "score" stage
(everything the pre-LLM cut does: scores, selection, the cut) and of the pruned prefill
(keep --keep, layer -1, fixed policy, drop pruner); share = score / prefill; and one
unpruned prefill (keep 1.0) per round for the prefill ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.util
import pstats
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsevlm_exp.metrics import efficiency  # noqa: E402

MODULES = {"cdpruner": "sparsevlm_exp/scorers/cdpruner.py", "vispruner": "sparsevlm_exp/scorers/vispruner.py",
           "divprune": "sparsevlm_exp/scorers/divprune.py", "visionzip": "sparsevlm_exp/scorers/visionzip.py"}


def cpu_clock() -> None:
    """The engine's StageTimer reads time.perf_counter; on a CPU give it this thread's CPU time."""
    efficiency.time = types.SimpleNamespace(perf_counter=time.thread_time)


def old_module(name: str, ref: str):
    """The scorer module `name` as it is at git ref `ref`, imported as a sibling of the current one."""
    source = subprocess.run(["git", "show", f"{ref}:{MODULES[name]}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    full = f"sparsevlm_exp.scorers._old_{name}"
    spec = importlib.util.spec_from_loader(full, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "sparsevlm_exp.scorers"
    exec(compile(source, f"{ref}:{MODULES[name]}", "exec"), module.__dict__)
    return module


def old_scorer(new, module):
    """An instance of the old module's class of the same name with the new one's settings."""
    cls = getattr(module, type(new).__name__)
    old = cls.__new__(cls)
    old.__dict__.update(new.__dict__)
    return old


def setup(n_visual: int):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from sparsevlm_exp.bench import disable_eos, on_device, synthetic_inputs
    from sparsevlm_exp.models.loading import model_config
    from sparsevlm_exp.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="bench", overrides=["model=bench_cpu", "device=cpu"])
    m = cfg.model
    config = model_config(m.pretrained, random_init=m.random_init, architecture=m.architecture,
                          trust_remote_code=m.trust_remote_code)
    adapter = instantiate(m, _convert_="all")
    disable_eos(adapter.model)
    inputs = synthetic_inputs(config, n_visual, cfg.bench.prefix_tokens, cfg.bench.question_tokens, int(cfg.seed))
    req = adapter.request_from_inputs(on_device(inputs, adapter.device, keep_ids_on_cpu=True))
    return adapter, req


def prefill(adapter, req, parts, scorer=None):
    with torch.no_grad():
        state = adapter.prefill(req, scorer=scorer or parts["scorer"], policy=parts["policy"],
                                pruner=parts["pruner"], generator=torch.Generator().manual_seed(0))
    kept = state.events[0].kept_index if state.events else None
    return state.timings.get("score", 0.0), state.timings["prefill"], kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scorers", nargs="+", default=["cdpruner", "vispruner", "divprune", "visionzip"])
    ap.add_argument("--old-ref", default="main", help="git ref of the old selectors ('' = no old column)")
    ap.add_argument("--visual-tokens", type=int, default=1024)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: the main thread's CPU time (default; steady under load, but blind to work "
                         "on other threads); wall: perf_counter, what the bench measures (an idle machine only)")
    ap.add_argument("--profile", default=None, help="a scorer name: cProfile one pruned prefill's scoring instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        cpu_clock()
    from sparsevlm_exp.api import load_components

    adapter, req = setup(args.visual_tokens)
    if args.profile:
        parts = load_components(scorer=args.profile, keep=args.keep, layer=-1, policy="fixed", pruner="drop",
                                max_new_tokens=2)
        prefill(adapter, req, parts)
        profiler = cProfile.Profile(time.thread_time)
        timed = efficiency.StageTimer.__call__

        @contextlib.contextmanager
        def profiled(self, stage):            # profile the engine's "score" stage only
            with timed(self, stage):
                if stage == "score":
                    profiler.enable()
                try:
                    yield
                finally:
                    if stage == "score":
                        profiler.disable()

        efficiency.StageTimer.__call__ = profiled
        score, total, _ = prefill(adapter, req, parts)
        efficiency.StageTimer.__call__ = timed
        print(f"{args.profile}: score {score:.1f} CPU ms of prefill {total:.1f} CPU ms")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
        return
    full = load_components(scorer="divprune", keep=1.0, layer=-1, policy="fixed", pruner="drop", max_new_tokens=2)
    rows = []
    for name in args.scorers:
        parts = load_components(scorer=name, keep=args.keep, layer=-1, policy="fixed", pruner="drop",
                                max_new_tokens=2)
        old = old_scorer(parts["scorer"], old_module(name, args.old_ref)) if args.old_ref else None
        runs = {"new": [], "old": [], "full": []}
        same = True
        for r in range(args.warmup + args.rounds):
            new_run = prefill(adapter, req, parts)
            old_run = prefill(adapter, req, parts, old) if old is not None else None
            full_run = prefill(adapter, req, full)
            if old_run is not None:
                same &= torch.equal(new_run[2], old_run[2])
            if r >= args.warmup:
                runs["new"].append(new_run[:2])
                runs["full"].append(full_run[:2])
                if old_run is not None:
                    runs["old"].append(old_run[:2])

        def med(key, i):
            return statistics.median(x[i] for x in runs[key]) if runs[key] else float("nan")

        def share(key):
            return statistics.median(s / p for s, p in runs[key]) * 100 if runs[key] else float("nan")

        rows.append((name, med("old", 0), med("new", 0), share("old"), share("new"), med("new", 1),
                     med("full", 1), med("full", 1) / med("new", 1), same if old is not None else None))
    print(f"{args.visual_tokens} visual tokens, keep {args.keep}, layer -1, torch threads {args.threads}, "
          f"{'CPU ms of the main thread' if args.clock == 'cpu' else 'wall-clock ms'}, median of {args.rounds} rounds after {args.warmup} warm-up(s); "
          f"old = {args.old_ref or '-'}")
    print("| scorer | scoring CPU ms, old -> new | scoring % of pruned prefill, old -> new | pruned prefill ms (new) "
          "| keep 1.0 prefill ms | keep 1.0 / pruned | same kept tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, so, sn, po, pn, p, f, ratio, same in rows:
        print(f"| {name} | {so:.1f} -> {sn:.1f} | {po:.1f} -> **{pn:.1f}** | {p:.1f} | {f:.1f} | {ratio:.2f}x | "
              f"{'-' if same is None else ('yes' if same else 'NO')} |")


if __name__ == "__main__":
    main()
